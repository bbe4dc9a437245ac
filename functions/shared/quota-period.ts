/** Quota periods as API Gateway counts them, for the local gateway's quota and the per-period usage counters. */

export const QUOTA_PERIODS = ["DAY", "WEEK", "MONTH"] as const;
export type QuotaPeriod = (typeof QUOTA_PERIODS)[number];

/**
 * Start of the quota period holding `now`, in UTC, as API Gateway counts: DAY from midnight, WEEK from Sunday
 * + offset days, MONTH from the 1st + offset days ("The day that a time period starts. For example, with a time
 * period of WEEK, an offset of 0 starts on Sunday, and an offset of 1 starts on Monday", API reference,
 * QuotaSettings.offset). `YYYY-MM-DD`.
 */
export function quotaPeriodStart(period: QuotaPeriod, offset: number, now: number): string {
  const date = new Date(now);
  const day = Date.UTC(date.getUTCFullYear(), date.getUTCMonth(), date.getUTCDate());
  const DAY = 86_400_000;
  if (period === "DAY") return new Date(day).toISOString().slice(0, 10);
  if (period === "WEEK") {
    const sinceStart = (date.getUTCDay() - offset + 7) % 7;
    return new Date(day - sinceStart * DAY).toISOString().slice(0, 10);
  }
  let start = Date.UTC(date.getUTCFullYear(), date.getUTCMonth(), 1) + offset * DAY;
  if (start > now) start = Date.UTC(date.getUTCFullYear(), date.getUTCMonth() - 1, 1) + offset * DAY;
  return new Date(start).toISOString().slice(0, 10);
}
