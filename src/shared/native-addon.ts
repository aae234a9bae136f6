/**
 * A Node-API addon (one of the `*.node` files scripts/build.mjs makes) loaded from `file`;
 * throws what `process.dlopen` throws (a missing file, another architecture, a bad build), so
 * each caller decides what running without it means.
 */
export function loadNativeAddon<T>(file: string): T {
  const module = { exports: {} as T };
  process.dlopen(module, file);
  return module.exports;
}
