/**
 * The addresses the DNS forwarder gave each sandbox, per name, until they expire. The egress
 * proxy asks whether a connection to address X for domain D goes to an address the sandbox
 * really got for D, which stops a sandbox from naming an allowed host in SNI or Host while
 * connecting to any other address.
 */

/**
 * A pin lives at least this long, whatever the record's TTL: clients keep an address longer
 * than its TTL (connection pools, the JVM's 30 s cache, a retry after a slow handshake), and
 * CDNs answer with TTLs of a few seconds or 0; a pin that expired before the client connects
 * would deny a connection the policy allows.
 */
export const MIN_PIN_SECONDS = 30;
/**
 * A pin lives at most this long: an authoritative server can answer with a TTL of weeks, and
 * an address that moved to someone else (cloud IPs are reused) should not stay reachable under
 * an allowed name for that long. It also bounds how long memory holds stale entries.
 */
export const MAX_PIN_SECONDS = 3600;
export const DEFAULT_MAX_PINS_PER_SANDBOX = 4096;

export interface PinnedAddressesOptions {
  /** Milliseconds since the epoch (tests pass a fake clock). */
  now?: () => number;
  /** Pins (name, address pairs) kept per sandbox; the oldest pinned goes first when full. */
  maxPinsPerSandbox?: number;
}

interface Pin {
  name: string;
  address: string;
  expiresAt: number;
}

interface SandboxPins {
  /** `name address` → pin, in the order pinned (a pin again moves it to the end). */
  byKey: Map<string, Pin>;
  /** address → keys of the pins for it. */
  byAddress: Map<string, Set<string>>;
}

/** Lowercase, without the trailing dot: how names are compared. */
export function normalizeDomain(name: string): string {
  const trimmed = name.endsWith(".") ? name.slice(0, -1) : name;
  return trimmed.replace(/[A-Z]+/g, (run) => run.toLowerCase());
}

/** An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`, how a dual-stack socket reports IPv4) as IPv4. */
function normalizeAddress(address: string): string {
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(address);
  return (mapped ? mapped[1]! : address).toLowerCase();
}

export class PinnedAddresses {
  private readonly sandboxes = new Map<string, SandboxPins>();
  private readonly now: () => number;
  private readonly maxPinsPerSandbox: number;

  constructor(options: PinnedAddressesOptions = {}) {
    this.now = options.now ?? Date.now;
    this.maxPinsPerSandbox = Math.max(1, options.maxPinsPerSandbox ?? DEFAULT_MAX_PINS_PER_SANDBOX);
  }

  /**
   * Pins `addresses` for `name` until now + clamp(ttlSec, 30 s, 1 h). A subclass that also pins
   * elsewhere (the kernel's sets) returns a promise that settles once that is done.
   */
  pin(sandboxId: string, name: string, addresses: readonly string[], ttlSec: number): void | Promise<void> {
    if (addresses.length === 0) return;
    const seconds = Math.min(MAX_PIN_SECONDS, Math.max(MIN_PIN_SECONDS, Number.isFinite(ttlSec) ? ttlSec : 0));
    const expiresAt = this.now() + seconds * 1000;
    const domain = normalizeDomain(name);
    let pins = this.sandboxes.get(sandboxId);
    if (!pins) {
      pins = { byKey: new Map(), byAddress: new Map() };
      this.sandboxes.set(sandboxId, pins);
    }
    for (const raw of addresses) {
      const address = normalizeAddress(raw);
      const key = `${domain} ${address}`;
      const existing = pins.byKey.get(key);
      if (existing) {
        pins.byKey.delete(key); // re-insert: it is now the newest
        existing.expiresAt = Math.max(existing.expiresAt, expiresAt);
        pins.byKey.set(key, existing);
        continue;
      }
      pins.byKey.set(key, { name: domain, address, expiresAt });
      let keys = pins.byAddress.get(address);
      if (!keys) pins.byAddress.set(address, (keys = new Set()));
      keys.add(key);
      while (pins.byKey.size > this.maxPinsPerSandbox) {
        const oldest = pins.byKey.keys().next().value as string;
        this.remove(pins, oldest);
      }
    }
  }

  /** Whether the sandbox was given `address` for `name` and the pin has not expired. */
  isPinned(sandboxId: string, name: string, address: string): boolean {
    const pins = this.sandboxes.get(sandboxId);
    if (!pins) return false;
    const key = `${normalizeDomain(name)} ${normalizeAddress(address)}`;
    const pin = pins.byKey.get(key);
    if (!pin) return false;
    if (pin.expiresAt <= this.now()) {
      this.remove(pins, key);
      return false;
    }
    return true;
  }

  /** The names the sandbox was given `address` for (for a connection without SNI or Host), sorted. */
  namesFor(sandboxId: string, address: string): string[] {
    const pins = this.sandboxes.get(sandboxId);
    const keys = pins?.byAddress.get(normalizeAddress(address));
    if (!pins || !keys) return [];
    const now = this.now();
    const names: string[] = [];
    for (const key of [...keys]) {
      const pin = pins.byKey.get(key)!;
      if (pin.expiresAt <= now) this.remove(pins, key);
      else names.push(pin.name);
    }
    return names.sort();
  }

  /** The sandbox's unexpired pins with the seconds each has left (at least 1), oldest first. */
  live(sandboxId: string): { name: string; address: string; secondsLeft: number }[] {
    const pins = this.sandboxes.get(sandboxId);
    if (!pins) return [];
    const now = this.now();
    const live = [];
    for (const pin of pins.byKey.values()) if (pin.expiresAt > now) live.push({ name: pin.name, address: pin.address, secondsLeft: Math.max(1, Math.ceil((pin.expiresAt - now) / 1000)) });
    return live;
  }

  /** Forgets everything pinned for a sandbox (it ended). */
  drop(sandboxId: string): void {
    this.sandboxes.delete(sandboxId);
  }

  /** Pins held for a sandbox, expired ones not yet swept included (for tests and metrics). */
  size(sandboxId: string): number {
    return this.sandboxes.get(sandboxId)?.byKey.size ?? 0;
  }

  private remove(pins: SandboxPins, key: string): void {
    const pin = pins.byKey.get(key);
    if (!pin) return;
    pins.byKey.delete(key);
    const keys = pins.byAddress.get(pin.address);
    keys?.delete(key);
    if (keys && keys.size === 0) pins.byAddress.delete(pin.address);
  }
}
