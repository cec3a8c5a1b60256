// Open a WHATWG EventSource (the `eventsource` package, not our code) to a URL
// and print what it sees, one JSON object per line on stdout:
//   {"type": "open", "readyState": 1}
//   {"type": "<event type>", "id": "<lastEventId>", "data": "<data>"}
//   {"type": "error", "readyState": 0|2}   (0: it will reconnect; 2: it gave up)
// Usage: node eventsource.mjs URL [EVENT TYPE ...]  (types besides `message`
// to listen for: EventSource only delivers the types it was told about).
// It exits once the EventSource is CLOSED, or when stdin closes (the test ends).
import { EventSource } from 'eventsource';

const [url, ...types] = process.argv.slice(2);
if (!url) {
  console.error('usage: node eventsource.mjs URL [EVENT TYPE ...]');
  process.exit(2);
}
const print = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const source = new EventSource(url);
source.addEventListener('open', () => print({ type: 'open', readyState: source.readyState }));
for (const type of new Set(['message', ...types])) {
  source.addEventListener(type, (event) => {
    // A server `error` event has data; EventSource's own connection errors do not.
    if (type === 'error' && event.data === undefined) return;
    print({ type, id: event.lastEventId, data: event.data });
  });
}
source.addEventListener('error', (event) => {
  if (event.data !== undefined) return;
  print({ type: 'error', readyState: source.readyState, message: event.message ?? null });
  if (source.readyState === EventSource.CLOSED) process.exit(0);
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
