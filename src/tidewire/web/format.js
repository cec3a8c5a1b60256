// How the page writes sizes: one function, so that every number of bytes on
// the page reads the same way.
//
// Decimal SI units (1 kB = 1000 bytes, 1 MB = 1000 kB), as browsers' download
// lists and most file managers show them, so a file the page calls 50 MB is
// 50 MB in the user's downloads too. The page's own options ("Resumable above
// (MB)") count in the same units.

const UNITS = [
  ['B', 1],
  ['kB', 1e3],
  ['MB', 1e6],
  ['GB', 1e9],
  ['TB', 1e12],
  ['PB', 1e15],
];

/** Bytes in decimal units: 999 → "999 B", 1500 → "1.5 kB", 50000000 → "50 MB". */
export function formatBytes(bytes) {
  if (!Number.isFinite(bytes) || bytes < 0) return '—';
  const n = Math.round(bytes);
  // The largest unit that shows at least "1.0": 999,500 bytes is 1.0 MB, not 1000 kB.
  let i = UNITS.length - 1;
  while (i > 0 && n < UNITS[i][1] * 0.9995) i -= 1;
  const [unit, scale] = UNITS[i];
  if (i === 0) return `${n} B`;
  // Rounded from whole numbers, not with toFixed on a float: 2,050,000 bytes is
  // 2.1 MB (half up), where (2.05).toFixed(1) says "2.0".
  const tenths = Math.round((n * 10) / scale);
  // Three significant digits at most: 1.5 kB, 25 MB, 320 MB.
  if (tenths < 100) return `${Math.floor(tenths / 10)}.${tenths % 10} ${unit}`;
  return `${Math.round(n / scale)} ${unit}`;
}

/** 1 MB, the unit of the page's size options, in bytes. */
export const MB = 1000 * 1000;
