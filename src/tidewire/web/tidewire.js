/**
 * tidewire.js: receive tidewire streams and channels in a browser, publish, upload.
 *
 * An ES module with no build step. It imports Axios (vendored beside it) and
 * loads tus-js-client on first use of a resumable upload.
 *
 *   import { streamNdjson } from '/web/tidewire.js';
 *   const run = streamNdjson('demo', { n: 20 }, { onEvent: (e) => console.log(e) });
 *   await run.done;                       // the last event: end, error or cancelled
 *
 * Every event is the server's envelope, the same on every transport:
 *   { id: "<opaque>", event: "message" | "<type>" | "end" | "error" | "cancelled" | "gap", data }
 *
 * Streams (`streamNdjson`, `streamSse`, `streamWs`) and subscriptions
 * (`subscribe`) resume by themselves after a dropped connection, from the
 * last id they delivered, so nothing is lost or repeated; `onStatus` tells
 * when they do. They are also async iterables: `for await (const e of run)`.
 *
 * A server with access control wants a token: `setToken(t)` for every call,
 * or a `token` option on one call (a string, or a function returning one or a
 * promise of one, called again for each new connection). It travels as
 * `Authorization: Bearer` where a header can be set (Axios, fetch, tus) and as
 * `?access_token=` where none can (EventSource, WebSocket, <img>, <a>).
 *
 * The full API is in docs/browser.md.
 */

import axios from './vendor/axios-1.21.1/axios.min.js';

export { axios };

// tus-js-client's only browser build is a UMD bundle (its ESM build imports
// bare npm package names), so it is loaded as a classic script on first use.
const TUS_SRC = new URL('./vendor/tus-js-client-4.3.1/tus.min.js', import.meta.url).href;

/** Event types that end a run: the last event of every run is one of them. */
export const TERMINAL = Object.freeze(['end', 'error', 'cancelled']);
// EventSource only delivers event types it was told to listen to.
const SSE_TYPES = ['message', 'end', 'error', 'cancelled', 'gap', 'unavailable'];
const BACKOFF_MS = [250, 500, 1000, 2000, 4000];

/** Files above this many bytes go up resumably (tus) unless told otherwise. */
export const RESUMABLE_ABOVE = 16 * 1024 * 1024;

// ---------------------------------------------------------------- helpers

/** The query parameter a token travels in where no header can be set (RFC 6750). */
export const ACCESS_TOKEN_PARAM = 'access_token';

let defaultToken = null;

/**
 * The token every call sends unless given its own `token` option: a string,
 * a function returning one (or a promise of one), or null for none.
 */
export function setToken(token) {
  defaultToken = token || null;
}

function tokenSource(options) {
  return options && options.token !== undefined ? options.token : defaultToken;
}

/** The token to send now (a function is called each time: a new connection gets a fresh one). */
async function tokenOf(source) {
  const value = typeof source === 'function' ? await source() : source;
  return value || null;
}

/** The token, for what must be known at once (an <img> src); a promised one is left out. */
function tokenNow(source) {
  const value = typeof source === 'function' ? source() : source;
  return typeof value === 'string' && value ? value : null;
}

const bearer = (token) => (token ? { Authorization: `Bearer ${token}` } : {});

function withToken(u, token) {
  if (token) u.searchParams.set(ACCESS_TOKEN_PARAM, token);
  return u;
}

// A stored file: `/files/<id>`, the only URL a blob may point at. Anyone who
// may publish could otherwise make every reader load a URL of their choosing,
// with the reader's token.
const FILE_PATH = /^\/files\/[0-9a-v]{22}$/;

/** `base` is where tidewire is mounted ('' for the site's root, or '/tw'). */
function url(base, path, query) {
  const u = new URL((base || '').replace(/\/$/, '') + path, globalThis.location.href);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null) u.searchParams.set(key, String(value));
  }
  return u;
}

function wsUrl(base, path, query) {
  const u = url(base, path, query);
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  return u.href;
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => (clearTimeout(timer), resolve()), { once: true });
  });

/** An Error carrying the HTTP status and the server's `detail`, when there is one. */
export class TidewireError extends Error {
  constructor(message, { status = 0, detail = null } = {}) {
    super(message);
    this.name = 'TidewireError';
    this.status = status;
    this.detail = detail;
  }
}

function describeDetail(detail) {
  if (Array.isArray(detail)) {
    // FastAPI's 422: [{loc: ["query", "n"], msg}, ...]
    return detail.map((d) => `${(d.loc || []).slice(1).join('.') || 'value'}: ${d.msg}`).join('; ');
  }
  return typeof detail === 'string' ? detail : JSON.stringify(detail);
}

/** Turn an Axios error (whose body may be a stream) into a TidewireError. */
async function toError(err, what) {
  if (err instanceof TidewireError) return err;
  const response = err?.response;
  if (!response) return new TidewireError(`${what}: ${err?.message || err}`);
  let detail = response.data;
  try {
    if (detail instanceof ReadableStream) detail = await new Response(detail).json();
    else if (typeof detail === 'string') detail = JSON.parse(detail);
  } catch {
    detail = null;
  }
  detail = detail?.detail ?? detail;
  const text = detail ? describeDetail(detail) : response.statusText || 'request failed';
  return new TidewireError(`${what}: ${response.status} ${text}`, {
    status: response.status,
    detail,
  });
}

/** Is this value a tidewire blob (`{"$blob": {type, size, data | url}}`)? */
export function isBlob(value) {
  return Boolean(value && typeof value === 'object' && value.$blob && value.$blob.type);
}

/**
 * A URL an <img>, <a> or fetch can use for a blob: a data: URL, or the file's
 * URL (with the token, if any, as `?access_token=`: an <img> sends no header).
 * A blob whose url is not a file of this server (`/files/<id>`) is refused.
 */
export function blobUrl(value, options = {}) {
  const blob = value.$blob;
  if (blob.url) {
    if (!FILE_PATH.test(blob.url)) {
      throw new TidewireError(`a blob's url ${JSON.stringify(blob.url)} is not a file of this server`);
    }
    return withToken(url(options.base, blob.url), tokenNow(tokenSource(options))).href;
  }
  return `data:${blob.type};base64,${blob.data}`;
}

// Runs this page started and has not seen end: cancelled when the page goes
// away, since a detached run is not cancelled when its watchers leave.
const ownRuns = new Map(); // run id -> {base, token}: the last token the run was watched with
globalThis.addEventListener?.('pagehide', () => {
  for (const [run, { base, token }] of ownRuns) {
    fetch(url(base, `/runs/${encodeURIComponent(run)}`), {
      method: 'DELETE',
      keepalive: true,
      headers: bearer(token),
    }).catch(() => {});
  }
  ownRuns.clear();
});

// ---------------------------------------------------------------- watching

/**
 * One logical stream of events over one transport, made of as many
 * connections as it takes: each resumes after the last delivered id.
 */
class Watch {
  constructor({ transport, base, path, after, types, onEvent, onStatus, ends, token }) {
    this.transport = transport;
    this.base = base || '';
    this.tokenSource = token;
    this.token = null; // the one the current connection was made with
    this.path = path; // '/runs/<id>' or '/channels/<name>', once known
    this.lastId = after ?? null;
    this.types = [...new Set([...SSE_TYPES, ...(types || [])])];
    this.ends = ends; // runs end; channels do not
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.state = 'connecting';
    this.reconnects = 0;
    this.received = 0;
    this.finished = false;
    // The server said `unavailable` (it is draining, or lost its broker) and
    // ends the connection: the next one is made at once, not after a backoff.
    this.resumeNow = false;
    this.abort = new AbortController();
    this._queue = [];
    this._waiters = [];
    this._iterating = false;
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.done.catch(() => {}); // a failure is reported through onStatus too
  }

  status(state, extra = {}) {
    this.state = state;
    this.onStatus?.({
      state,
      transport: this.transport,
      reconnects: this.reconnects,
      lastId: this.lastId,
      received: this.received,
      ...extra,
    });
  }

  deliver(event) {
    if (this.finished) return;
    if (event.id !== undefined && event.id !== null) this.lastId = event.id;
    this.received += 1;
    try {
      this.onEvent?.(event);
    } catch (err) {
      // A failing callback must not break the stream; report it where it can be seen.
      setTimeout(() => {
        throw err;
      });
    }
    if (this._iterating) this._push({ value: event, done: false });
    if (this.ends && TERMINAL.includes(event.event)) this.finish(event);
  }

  finish(last) {
    if (this.finished) return;
    this.finished = true;
    this.abort.abort();
    this.status('closed', { last });
    this._resolve(last ?? null);
    this._push({ value: undefined, done: true });
  }

  fail(error) {
    if (this.finished) return;
    this.finished = true;
    this.abort.abort();
    this.status('failed', { error });
    this._reject(error);
    this._push({ value: undefined, done: true, error });
  }

  _push(item) {
    const waiter = this._waiters.shift();
    if (waiter) waiter(item);
    else this._queue.push(item);
  }

  [Symbol.asyncIterator]() {
    this._iterating = true;
    return {
      next: () => {
        const item = this._queue.shift();
        const got = item ? Promise.resolve(item) : new Promise((r) => this._waiters.push(r));
        return got.then((i) => (i.error ? Promise.reject(i.error) : i));
      },
      return: () => {
        this.close();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }

  /** Stop watching (a run goes on; see stop()). */
  close() {
    this.finish(null);
  }

  /**
   * Keep a connection going until the stream ends: `connect()` resolves when a
   * connection ends (or rejects when it fails), and we resume after lastId.
   * By default each connection follows this watch's transport.
   */
  async keepConnected(connect = (first) => this.follow(first)) {
    let failures = 0;
    let first = true;
    let refreshed = false;
    while (!this.finished) {
      const seen = this.received;
      let error = null;
      try {
        // Each connection asks for the token anew: one given as a function
        // may have been renewed while the last connection lasted.
        this.token = await tokenOf(this.tokenSource);
        await connect(first);
      } catch (err) {
        error = err;
      }
      first = false;
      if (this.finished) return;
      if (this.received > seen) refreshed = false;
      if (this.resumeNow) {
        this.resumeNow = false;
        // From the last id, at once: behind a balancer, on another server
        // (the notice was reported as it came).
        if (!error) continue;
      }
      if (error?.status === 401 && typeof this.tokenSource === 'function' && !refreshed) {
        refreshed = true; // once: a new token, at once; a second 401 is the caller's to see
        continue;
      }
      if (
        error &&
        error.status >= 400 &&
        error.status < 500 &&
        error.status !== 408 &&
        error.status !== 429
      ) {
        return this.fail(error); // 404 (a run expired), 400 (a bad id): trying again cannot help
      }
      failures = this.received > seen ? 1 : failures + 1;
      const wait = error?.retryAfter ?? BACKOFF_MS[Math.min(failures - 1, BACKOFF_MS.length - 1)];
      this.status('reconnecting', { error, attempt: failures, retryIn: wait });
      await sleep(wait, this.abort.signal);
      if (failures >= 3 && this.ends) await this.checkExists();
    }
  }

  /** After repeated failures: is the run still there (a WebSocket cannot say 404)? */
  async checkExists() {
    if (this.finished || !this.path) return;
    try {
      const response = await fetch(url(this.base, this.path), {
        signal: this.abort.signal,
        headers: bearer(this.token),
      });
      if (response.status === 404) {
        this.fail(new TidewireError('the run is gone (expired or never existed)', { status: 404 }));
      }
    } catch {
      // still unreachable: keep trying
    }
  }

  opened(first) {
    if (!first) this.reconnects += 1;
    this.status('open', first ? {} : { resumedAfter: this.lastId });
  }

  // One connection over this watch's transport, from the last id on.
  follow(first) {
    if (this.transport === 'sse') return this.readSse(first);
    if (this.transport === 'ws') return this.readWs(first);
    return this.readNdjson(
      { method: 'get', url: url(this.base, `${this.path}/events`, { after: this.lastId }).href },
      first,
    );
  }

  // -- NDJSON through Axios's fetch adapter: a ReadableStream of lines.
  async readNdjson(request, first, what = 'connect') {
    let response;
    try {
      response = await axios.request({
        adapter: 'fetch',
        responseType: 'stream',
        signal: this.abort.signal,
        ...request,
        headers: { Accept: 'application/x-ndjson', ...bearer(this.token), ...request.headers },
      });
    } catch (err) {
      if (this.finished) return;
      const error = await toError(err, what);
      if (error.status === 503) error.retryAfter = 1000 * Number(err.response?.headers?.['retry-after'] || 1);
      throw error;
    }
    this.opened(first);
    const runId = response.headers['tidewire-run'];
    if (runId && !this.path) this.started(runId);
    const reader = response.data.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        // A chunk may end in the middle of a line: keep the rest for the next one.
        let newline;
        while ((newline = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, newline).trim();
          buffer = buffer.slice(newline + 1);
          if (!line) continue; // heartbeat
          const event = JSON.parse(line);
          if (event.id === undefined || event.id === null) {
            // `unavailable`: the server ends this response; resume at once.
            if (event.event === 'unavailable') this.resumeNow = true;
            this.status('reconnecting', { notice: event });
            continue;
          }
          this.deliver(event);
          if (this.finished) return;
        }
      }
    } catch (err) {
      if (this.finished) return;
      throw new TidewireError(`connection lost: ${err?.message || err}`);
    } finally {
      reader.cancel().catch(() => {});
    }
    // The response ended before the run did: resume.
  }

  // -- SSE through EventSource, which reconnects by itself with Last-Event-ID.
  readSse(first) {
    return new Promise((resolve, reject) => {
      // EventSource sends no headers: the token goes in the query. (Its own
      // reconnects reuse this URL; when they fail, a new one gets a new token.)
      const where = url(this.base, `${this.path}/events`, { after: this.lastId });
      const source = new EventSource(withToken(where, this.token));
      let open = false;
      let firstOpen = first;
      const stop = () => {
        source.close();
        resolve();
      };
      this.abort.signal.addEventListener('abort', stop, { once: true });
      source.addEventListener('open', () => {
        open = true;
        this.opened(firstOpen);
        firstOpen = false;
      });
      const onMessage = (e) => {
        if (e.type === 'unavailable') {
          // Not after EventSource's own `retry:` (2 s): at once, from the last id.
          this.resumeNow = true;
          this.status('reconnecting', { notice: { event: 'unavailable', data: JSON.parse(e.data) } });
          this.abort.signal.removeEventListener('abort', stop);
          source.close();
          resolve();
          return;
        }
        this.deliver({ id: e.lastEventId, event: e.type, data: JSON.parse(e.data) });
        if (this.finished) source.close(); // else EventSource would reconnect after `end`
      };
      for (const type of this.types) {
        if (type !== 'error') source.addEventListener(type, onMessage);
      }
      // The server's `error` event and EventSource's own connection errors share a name.
      source.addEventListener('error', (e) => {
        if (e instanceof MessageEvent) return onMessage(e);
        if (this.finished) return;
        if (source.readyState === EventSource.CONNECTING) {
          // EventSource tries again by itself (after the server's `retry:`), with Last-Event-ID.
          if (open) this.status('reconnecting', {});
          open = false;
          return;
        }
        // CLOSED: EventSource gave up (an HTTP error status, or a failed reconnect).
        this.abort.signal.removeEventListener('abort', stop);
        source.close();
        reject(new TidewireError('the event stream closed'));
      });
    });
  }

  // -- WebSocket: one JSON envelope per text frame.
  readWs(first) {
    return new Promise((resolve, reject) => {
      // A browser's WebSocket sends no headers either.
      const query = { after: this.lastId, [ACCESS_TOKEN_PARAM]: this.token };
      const socket = new WebSocket(wsUrl(this.base, `${this.path}/ws`, query));
      const stop = () => {
        socket.close(1000);
        resolve();
      };
      this.abort.signal.addEventListener('abort', stop, { once: true });
      socket.addEventListener('open', () => this.opened(first));
      socket.addEventListener('message', (e) => {
        if (typeof e.data !== 'string') return;
        const event = JSON.parse(e.data);
        if (event.id === undefined || event.id === null) {
          // `unavailable` (the server is draining; it closes with 1012): resume at once.
          if (event.event === 'unavailable') this.resumeNow = true;
          this.status('reconnecting', { notice: event });
          return;
        }
        this.deliver(event);
      });
      socket.addEventListener('error', () => {}); // always followed by close
      socket.addEventListener('close', (e) => {
        this.abort.signal.removeEventListener('abort', stop);
        if (this.finished) return resolve();
        if (e.code === 1000) return resolve(); // the server ended cleanly; resume if not finished
        if (this.resumeNow) return resolve(); // after the `unavailable` notice (close 1012)
        const why = e.code === 1013 ? 'server unavailable' : `closed (${e.code})`;
        reject(new TidewireError(`websocket ${why}`));
      });
    });
  }
}

// ---------------------------------------------------------------- runs

/**
 * A run being watched. Besides Watch's: `run` (a promise of the run's id),
 * `runId`, `stop()` (cancel the run on the server).
 */
class RunWatch extends Watch {
  constructor(options) {
    super({ ...options, ends: true });
    this.runId = null;
    this.cancelOnLeave = options.cancelOnLeave !== false;
    this.run = new Promise((resolve, reject) => {
      this._runResolve = resolve;
      this._runReject = reject;
    });
    this.run.catch(() => {});
  }

  started(runId) {
    this.runId = runId;
    this.path = `/runs/${encodeURIComponent(runId)}`;
    if (this.cancelOnLeave) ownRuns.set(runId, { base: this.base, token: this.token });
    this._runResolve(runId);
    this.status(this.state);
  }

  status(state, extra = {}) {
    super.status(state, { runId: this.runId, ...extra });
  }

  finish(last) {
    if (this.runId && last) ownRuns.delete(this.runId);
    super.finish(last);
  }

  fail(error) {
    this._runReject(error);
    super.fail(error);
  }

  /**
   * Cancel the run on the server (`DELETE /runs/{id}`) and wait for its
   * `cancelled` event (or whatever ended it first). Resolves with the last event.
   */
  async stop({ timeout = 3000 } = {}) {
    if (this.finished) return this.done;
    let runId;
    try {
      runId = await this.run;
    } catch {
      return null;
    }
    try {
      const token = await tokenOf(this.tokenSource);
      const response = await fetch(url(this.base, this.path), { method: 'DELETE', headers: bearer(token) });
      // 409: it had already ended; its last event is on its way.
      if (!response.ok && response.status !== 409) {
        const body = await response.json().catch(() => ({}));
        throw new TidewireError(`cancel ${runId}: ${response.status} ${describeDetail(body.detail)}`, {
          status: response.status,
        });
      }
    } finally {
      ownRuns.delete(runId);
    }
    const timer = sleep(timeout, this.abort.signal).then(() =>
      this.finish({ id: null, event: 'cancelled', data: null }),
    );
    await Promise.race([this.done, timer]);
    return this.done;
  }
}

function startOptions(options) {
  return {
    base: options.base || '',
    onEvent: options.onEvent,
    onStatus: options.onStatus,
    types: options.types,
    token: tokenSource(options),
  };
}

async function startDetached(watch, name, params) {
  let response;
  try {
    watch.token = await tokenOf(watch.tokenSource);
    response = await axios.post(
      url(watch.base, `/streams/${encodeURIComponent(name)}`, { detach: 'true' }).href,
      params || {},
      { signal: watch.abort.signal, headers: bearer(watch.token) },
    );
  } catch (err) {
    throw await toError(err, `start ${name}`);
  }
  watch.started(response.data.run);
}

/**
 * Start a run of stream `name` and read it as NDJSON through Axios (its fetch
 * adapter with `responseType: 'stream'`). The run is attached: the server
 * cancels it a while after its last watcher leaves.
 *
 * @param {string} name  the stream's name (see GET /streams)
 * @param {object} [params]  its parameters, sent as a JSON body
 * @param {{base?: string, onEvent?: Function, onStatus?: Function, cancelOnLeave?: boolean}} [options]
 * @returns {RunWatch}
 */
export function streamNdjson(name, params = {}, options = {}) {
  const watch = new RunWatch({
    transport: 'ndjson',
    ...startOptions(options),
    cancelOnLeave: options.cancelOnLeave,
  });
  const start = {
    method: 'post',
    url: url(watch.base, `/streams/${encodeURIComponent(name)}`).href,
    data: params,
  };
  watch
    .keepConnected(async (first) => {
      if (!first) {
        return watch.follow(false);
      }
      try {
        await watch.readNdjson(start, true, `start ${name}`);
      } catch (err) {
        // Before its id came back the run may or may not have started: starting
        // again could make two, so only a known run is resumed.
        if (!watch.path) watch.fail(err);
        throw err;
      }
    })
    .catch((err) => watch.fail(err));
  return watch;
}

function detachedStream(transport, name, params, options) {
  const watch = new RunWatch({ transport, ...startOptions(options), cancelOnLeave: options.cancelOnLeave });
  startDetached(watch, name, params)
    .then(() =>
      watch.keepConnected(),
    )
    .catch((err) => watch.fail(err));
  return watch;
}

/**
 * Start a run (`POST /streams/{name}?detach=true`) and watch it with
 * EventSource (`GET /runs/{id}/events`). EventSource only reports the event
 * types it listens to: name your stream's own types in `options.types`.
 */
export function streamSse(name, params = {}, options = {}) {
  return detachedStream('sse', name, params, options);
}

/** Start a run (`POST /streams/{name}?detach=true`) and watch it over a WebSocket (`/runs/{id}/ws`). */
export function streamWs(name, params = {}, options = {}) {
  return detachedStream('ws', name, params, options);
}

/** Watch a run that already exists (started elsewhere), from `options.after` on. */
export function watchRun(runId, options = {}) {
  const transport = options.transport || 'sse';
  const watch = new RunWatch({
    transport,
    ...startOptions(options),
    after: options.after,
    cancelOnLeave: false,
  });
  watch.started(runId);
  watch
    .keepConnected()
    .catch((err) => watch.fail(err));
  return watch;
}

/** Cancel a run: `DELETE /runs/{id}`. Resolves with the run's record; false if it had already ended. */
export async function cancelRun(runId, options = {}) {
  const token = await tokenOf(tokenSource(options));
  const response = await fetch(url(options.base, `/runs/${encodeURIComponent(runId)}`), {
    method: 'DELETE',
    headers: bearer(token),
  });
  if (response.status === 409) return false;
  if (!response.ok)
    throw new TidewireError(`cancel ${runId}: ${response.status}`, { status: response.status });
  return response.json();
}

/** The registered streams: `[{name, description, params: <JSON Schema>}]`. */
export async function listStreams(options = {}) {
  try {
    const headers = bearer(await tokenOf(tokenSource(options)));
    return (await axios.get(url(options.base, '/streams').href, { headers })).data;
  } catch (err) {
    throw await toError(err, 'list streams');
  }
}

// ---------------------------------------------------------------- channels

/**
 * Subscribe to a channel. `options.after`: resume after this id; '0' replays
 * the retained history; none means live from now. `options.transport`:
 * 'sse' (default), 'ws' or 'ndjson'. Returns a subscription with `close()`.
 */
export function subscribe(channel, options = {}) {
  const transport = options.transport || 'sse';
  const watch = new Watch({
    transport,
    ...startOptions(options),
    path: `/channels/${encodeURIComponent(channel)}`,
    after: options.after,
    ends: false,
  });
  watch
    .keepConnected()
    .catch((err) => watch.fail(err));
  return watch;
}

/**
 * Publish to a channel. `data` is any JSON value (sent as the event's data),
 * or a FormData (its fields become data, its files blobs). Resolves with the event's id.
 */
export async function publish(channel, data, options = {}) {
  const { event, base = '' } = options;
  const form = typeof FormData !== 'undefined' && data instanceof FormData;
  try {
    const headers = bearer(await tokenOf(tokenSource(options)));
    const response = await axios.post(
      url(base, `/channels/${encodeURIComponent(channel)}/events`, { event }).href,
      form ? data : JSON.stringify(data === undefined ? null : data),
      { headers: form ? headers : { 'Content-Type': 'application/json', ...headers } },
    );
    return response.data.id;
  } catch (err) {
    throw await toError(err, `publish to ${channel}`);
  }
}

// ---------------------------------------------------------------- files

let tusLoading = null;

/** tus-js-client, loaded on first use. */
export function loadTus() {
  if (globalThis.tus) return Promise.resolve(globalThis.tus);
  tusLoading ??= new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = TUS_SRC;
    script.onload = () => resolve(globalThis.tus);
    script.onerror = () => {
      tusLoading = null;
      reject(new TidewireError(`could not load ${TUS_SRC}`));
    };
    document.head.append(script);
  });
  return tusLoading;
}

/**
 * Upload one File. Small files go as multipart (`POST /files`, Axios with
 * `onUploadProgress`); files above `resumableAbove` bytes go through tus
 * (`/uploads/`), which resumes where it stopped, even after a reload once the
 * same file is picked again.
 *
 * options: base, onProgress({loaded, total, fraction}), onResume({offset, total}),
 *          resumable (true | false | 'auto'), resumableAbove, chunkSize (tus; bytes)
 * Returns {method, done: Promise<metadata>, abort()}.
 */
export function upload(file, options = {}) {
  const { base = '', onProgress, onResume } = options;
  const token = tokenSource(options);
  const resumable = options.resumable ?? 'auto';
  const tusMode =
    resumable === true || (resumable === 'auto' && file.size > (options.resumableAbove ?? RESUMABLE_ABOVE));
  const progress = (loaded, total) =>
    onProgress?.({ loaded, total, fraction: total ? Math.min(1, loaded / total) : 1 });

  if (!tusMode) {
    const controller = new AbortController();
    const form = new FormData();
    form.append('file', file, file.name);
    const done = tokenOf(token)
      .then((current) =>
        axios.post(url(base, '/files').href, form, {
          signal: controller.signal,
          headers: bearer(current),
        // The body is the file plus a few hundred bytes of multipart framing.
          onUploadProgress: (e) =>
            progress(e.progress === undefined ? e.loaded : e.progress * file.size, file.size),
        }),
      )
      .then((response) => {
        progress(file.size, file.size);
        return response.data[0];
      })
      .catch(async (err) => {
        throw await toError(err, `upload ${file.name}`);
      });
    return { method: 'multipart', done, abort: () => controller.abort() };
  }

  let instance = null;
  let aborted = false;
  const done = loadTus().then(
    (tus) =>
      new Promise((resolve, reject) => {
        let fileId = null;
        instance = new tus.Upload(file, {
          endpoint: url(base, '/uploads/').href,
          chunkSize: options.chunkSize ?? 8 * 1024 * 1024,
          retryDelays: [0, 1000, 3000, 5000],
          metadata: { filename: file.name, filetype: file.type || 'application/octet-stream' },
          // A finished upload is a file: nothing to resume any more.
          removeFingerprintOnSuccess: true,
          onProgress: (sent, total) => progress(sent, total),
          // Every request of the upload (POST, HEAD, PATCH) asks for the token:
          // a long upload outlives a short-lived one.
          onBeforeRequest: async (req) => {
            const current = await tokenOf(token);
            if (current) req.setHeader('Authorization', `Bearer ${current}`);
          },
          onAfterResponse: (req, res) => {
            fileId = res.getHeader('Tidewire-File') || fileId;
            if (req.getMethod() === 'HEAD') {
              onResume?.({ offset: Number(res.getHeader('Upload-Offset') || 0), total: file.size });
            }
          },
          onError: (err) =>
            reject(
              new TidewireError(
                `upload ${file.name}: ${err.originalResponse ? err.originalResponse.getBody() || err.message : err.message}`,
              ),
            ),
          onSuccess: async () => {
            try {
              const headers = bearer(await tokenOf(token));
              const response = await axios.get(url(base, `/files/${fileId}/meta`).href, { headers });
              resolve(response.data);
            } catch (err) {
              reject(await toError(err, `upload ${file.name}`));
            }
          },
        });
        if (aborted) return reject(new TidewireError('upload cancelled'));
        instance.findPreviousUploads().then((previous) => {
          if (previous.length) instance.resumeFromPreviousUpload(previous[0]);
          if (!aborted) instance.start();
        }, reject);
      }),
  );
  return {
    method: 'tus',
    done,
    /** Stop; `terminate` also deletes what the server has (else it can resume later). */
    abort: (terminate = true) => {
      aborted = true;
      return instance?.abort(terminate);
    },
  };
}

/**
 * How far an upload got, from the server: a tus `HEAD` gives `Upload-Offset`.
 * `{offset, gone}`: `gone` when the server no longer has it (expired or
 * deleted: choosing the file again starts over); `offset` is null when the
 * server could not be asked.
 */
async function uploadOffset(uploadUrl, token) {
  if (!uploadUrl) return { offset: null, gone: false };
  try {
    const response = await fetch(uploadUrl, {
      method: 'HEAD',
      headers: { 'Tus-Resumable': '1.0.0', ...bearer(token) },
      cache: 'no-store', // tus requires it; a cached offset would be a wrong one
    });
    if (response.status === 404 || response.status === 410) return { offset: 0, gone: true };
    const offset = Number.parseInt(response.headers.get('Upload-Offset') ?? '', 10);
    return { offset: response.ok && Number.isFinite(offset) ? offset : null, gone: false };
  } catch {
    return { offset: null, gone: false };
  }
}

/**
 * Resumable uploads this browser has started and not finished:
 * [{name, size, offset, gone, uploadUrl, created, key}]; `offset` is how many
 * of the `size` bytes the server has (null if it could not be asked), `gone`
 * says it has none any more.
 */
export async function unfinishedUploads(options = {}) {
  // tus-js-client keeps them in localStorage under 'tus::…': with none, it need not be loaded.
  if (!Object.keys(localStorage).some((k) => k.startsWith('tus::'))) return [];
  const tus = await loadTus();
  const found = await tus.defaultOptions.urlStorage.findAllUploads();
  const token = await tokenOf(tokenSource(options));
  return Promise.all(
    found.map(async (u) => ({
      name: u.metadata?.filename || '(unnamed)',
      size: u.size,
      ...(await uploadOffset(u.uploadUrl, token)),
      uploadUrl: u.uploadUrl,
      created: u.creationTime,
      key: u.urlStorageKey,
    })),
  );
}

/** Forget an unfinished upload here and delete its bytes on the server. */
export async function discardUpload(unfinished, options = {}) {
  const tus = await loadTus();
  await tus.defaultOptions.urlStorage.removeUpload(unfinished.key);
  if (unfinished.uploadUrl) {
    const headers = { 'Tus-Resumable': '1.0.0', ...bearer(await tokenOf(tokenSource(options))) };
    await fetch(unfinished.uploadUrl, { method: 'DELETE', headers }).catch(() => {});
  }
}

/** A page of files, newest first: {files, next} (next: the cursor for the following page, or null). */
export async function listFiles(options = {}) {
  const { base = '', limit = 50, cursor } = options;
  try {
    const headers = bearer(await tokenOf(tokenSource(options)));
    const response = await axios.get(url(base, '/files', { limit, cursor }).href, { headers });
    return { files: response.data, next: response.headers['tidewire-next-cursor'] || null };
  } catch (err) {
    throw await toError(err, 'list files');
  }
}

/** Delete a stored file. */
export async function deleteFile(id, options = {}) {
  try {
    const headers = bearer(await tokenOf(tokenSource(options)));
    await axios.delete(url(options.base, `/files/${encodeURIComponent(id)}`).href, { headers });
  } catch (err) {
    throw await toError(err, `delete ${id}`);
  }
}

/**
 * The URL of a file's bytes; `download: true` makes the browser save it. With
 * a token it carries `?access_token=` (a link sends no header): to share a
 * file, make a signed link on the server instead (`POST /files/{id}/links`).
 */
export function fileUrl(id, options = {}) {
  const { base = '', download = false } = options;
  const u = url(base, `/files/${encodeURIComponent(id)}`, download ? { download: 1 } : {});
  return withToken(u, tokenNow(tokenSource(options))).href;
}
