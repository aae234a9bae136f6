/** Runs `worker` for `total` items with at most `concurrency` at once; never rejects. */
export async function runPool<T>(total: number, concurrency: number, worker: (index: number) => Promise<T>): Promise<PromiseSettledResult<T>[]> {
  const results: PromiseSettledResult<T>[] = new Array(total);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, total) }, async () => {
      while (next < total) {
        const index = next++;
        try {
          results[index] = { status: "fulfilled", value: await worker(index) };
        } catch (reason) {
          results[index] = { status: "rejected", reason };
        }
      }
    }),
  );
  return results;
}
