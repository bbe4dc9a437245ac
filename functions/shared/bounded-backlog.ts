/** Something waiting in memory, with its size (bytes of its serialised form). */
export interface Sized {
  bytes: number;
}

/**
 * A bounded in-memory FIFO of work waiting for a backend that failed (Moesif events for the direct send, ledger items
 * for the request path's ledger write): appended to and taken from the front, so concurrent senders that fail each put
 * back exactly what they took. At most `maxCount` entries and `maxBytes` in all; past that the oldest are dropped and
 * handed to `onDrop` (which logs them: they are still in their `*_deferred` log lines).
 */
export class BoundedBacklog<T extends Sized> {
  private entries: T[] = [];
  private total = 0;

  constructor(
    private readonly maxCount: number,
    private readonly maxBytes: number,
    private readonly onDrop: (dropped: T[]) => void,
  ) {}

  get length(): number {
    return this.entries.length;
  }

  /** Whether any waiting entry matches (e.g. one the backend refused before). */
  some(predicate: (entry: T) => boolean): boolean {
    return this.entries.some(predicate);
  }

  /** Appends a newly failed entry (the newest). */
  push(entry: T): void {
    this.entries.push(entry);
    this.total += entry.bytes;
    this.trim();
  }

  /** Takes the oldest entries: at most `maxCount` of them and `maxBytes` in all. */
  take(maxCount: number, maxBytes = Number.POSITIVE_INFINITY): T[] {
    let n = 0;
    let bytes = 0;
    while (n < this.entries.length && n < maxCount && bytes + this.entries[n].bytes <= maxBytes) bytes += this.entries[n++].bytes;
    if (n === 0) return [];
    this.total -= bytes;
    return this.entries.splice(0, n);
  }

  /** Returns taken entries to the front (they are the oldest), beside whatever others added meanwhile. */
  putBack(entries: T[]): void {
    if (entries.length === 0) return;
    this.entries.unshift(...entries);
    for (const entry of entries) this.total += entry.bytes;
    this.trim();
  }

  private trim(): void {
    let drop = 0;
    let bytes = this.total;
    while (drop < this.entries.length && (this.entries.length - drop > this.maxCount || bytes > this.maxBytes)) {
      bytes -= this.entries[drop++].bytes;
    }
    if (drop === 0) return;
    const dropped = this.entries.splice(0, drop);
    this.total = bytes;
    this.onDrop(dropped);
  }
}
