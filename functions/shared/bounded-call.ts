/**
 * One store call bounded in time: `work` gets an abort signal that fires at the timeout, and the call rejects at the
 * timeout even if the SDK ignores the signal. Every failure is turned into the store's own error by `toError`
 * (the timeout's too), so callers see one error class whatever went wrong. Used by the customers store and the
 * response-owners store.
 */
export async function boundedCall<T>(
  timeoutMs: number,
  work: (signal: AbortSignal) => Promise<T>,
  onTimeout: () => Error,
  toError: (err: unknown) => Error,
): Promise<T> {
  const controller = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const err = onTimeout();
      controller.abort(err);
      reject(err);
    }, timeoutMs);
    timer.unref?.();
  });
  try {
    return await Promise.race([work(controller.signal), deadline]);
  } catch (err) {
    throw toError(err);
  } finally {
    clearTimeout(timer);
  }
}
