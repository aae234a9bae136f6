import { CubicleError } from "../shared/cubicle-error.js";

/** One point-to-point link taken from the pool: host end `.1`, sandbox end `.2` of a /30. */
export interface LinkAddresses {
  blockIndex: number;
  hostAddress: string;
  sandboxAddress: string;
  prefixLength: 30;
}

/**
 * Hands out /30 blocks of an IPv4 CIDR. Blocks are taken round-robin so that a block freed a
 * moment ago is reused last: the kernel tears a deleted netns down asynchronously.
 */
export class AddressPool {
  readonly networkAddress: number;
  readonly prefixLength: number;
  readonly blockCount: number;
  private readonly used = new Set<number>();
  private cursor = 0;

  constructor(readonly cidr: string) {
    const match = /^(\d{1,3}(?:\.\d{1,3}){3})\/(\d{1,2})$/.exec(cidr.trim());
    const prefixLength = match ? Number(match[2]) : NaN;
    if (!match || !(prefixLength >= 8 && prefixLength <= 30)) {
      throw new CubicleError("invalid_argument", `subnet ${JSON.stringify(cidr)} is not an IPv4 CIDR between /8 and /30; set CUBICLE_SUBNET to something like 10.88.0.0/16`);
    }
    const base = parseIPv4(match[1]!);
    const mask = prefixLength === 0 ? 0 : (0xffffffff << (32 - prefixLength)) >>> 0;
    this.networkAddress = (base & mask) >>> 0;
    this.prefixLength = prefixLength;
    this.blockCount = 2 ** (30 - prefixLength);
  }

  /** Takes the next free block. */
  allocate(): LinkAddresses {
    for (let tried = 0; tried < this.blockCount; tried++) {
      const index = (this.cursor + tried) % this.blockCount;
      if (!this.used.has(index)) {
        this.used.add(index);
        this.cursor = (index + 1) % this.blockCount;
        return this.block(index);
      }
    }
    throw new CubicleError("resource_exhausted", `all ${this.blockCount} sandbox addresses of ${this.cidr} are in use; destroy sandboxes or configure a larger CUBICLE_SUBNET`);
  }

  /** Marks the block holding `sandboxAddress` used (after a restart). Returns its index. */
  claim(sandboxAddress: string): number {
    const index = this.indexOf(sandboxAddress);
    this.used.add(index);
    return index;
  }

  release(blockIndex: number): void {
    this.used.delete(blockIndex);
  }

  /** The pool as a CIDR with host bits cleared, e.g. 10.88.0.0/16. */
  get normalizedCidr(): string {
    return `${formatIPv4(this.networkAddress)}/${this.prefixLength}`;
  }

  get usedCount(): number {
    return this.used.size;
  }

  /** Whether an address lies inside the pool. */
  contains(address: string): boolean {
    const value = parseIPv4(address);
    return value - this.networkAddress >= 0 && value - this.networkAddress < this.blockCount * 4;
  }

  indexOf(sandboxAddress: string): number {
    const offset = parseIPv4(sandboxAddress) - this.networkAddress;
    if (offset < 0 || offset >= this.blockCount * 4 || offset % 4 !== 2) {
      throw new CubicleError("invalid_argument", `${sandboxAddress} is not a sandbox address of ${this.cidr}`);
    }
    return (offset - 2) / 4;
  }

  block(index: number): LinkAddresses {
    const start = this.networkAddress + index * 4;
    return { blockIndex: index, hostAddress: formatIPv4(start + 1), sandboxAddress: formatIPv4(start + 2), prefixLength: 30 };
  }
}

export function parseIPv4(text: string): number {
  const parts = text.split(".").map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) {
    throw new CubicleError("invalid_argument", `${JSON.stringify(text)} is not an IPv4 address`);
  }
  return ((parts[0]! << 24) | (parts[1]! << 16) | (parts[2]! << 8) | parts[3]!) >>> 0;
}

export function formatIPv4(value: number): string {
  return [value >>> 24, (value >>> 16) & 255, (value >>> 8) & 255, value & 255].join(".");
}
