// The page: three panels (streams, channels, files) over tidewire.js.
// Everything the page does with the server goes through tidewire.js, so this
// file is only about the interface.

import {
  blobUrl,
  deleteFile,
  discardUpload,
  fileUrl,
  isBlob,
  listFiles,
  listStreams,
  publish,
  setToken,
  streamNdjson,
  streamSse,
  streamWs,
  subscribe,
  unfinishedUploads,
  upload,
} from './tidewire.js';
import { formatBytes, MB } from './format.js';

const $ = (selector, root = document) => root.querySelector(selector);
const MAX_ROWS = 500; // the event lists keep this many rows; counters keep the totals
// Where tidewire is mounted: the folder this page is served from ('' at the site's root).
const BASE = new URL('.', location.href).pathname.replace(/\/$/, '');

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== 'string') node[key] = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function showError(node, error) {
  node.hidden = !error;
  node.textContent = error ? String(error.message || error) : '';
}

function formatTime(seconds) {
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'short' });
}

// ---------------------------------------------------------------- tabs

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab, focus = true) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute('aria-selected', String(on));
      t.tabIndex = on ? 0 : -1;
      document.getElementById(t.getAttribute('aria-controls')).hidden = !on;
    }
    if (focus) tab.focus();
    history.replaceState(null, '', `#${tab.id.replace('tab-', '')}`);
  };
  for (const tab of tabs) {
    tab.addEventListener('click', () => select(tab));
    tab.addEventListener('keydown', (e) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      select(tabs[(next + tabs.length) % tabs.length]);
    });
  }
  const fromHash = document.getElementById(`tab-${location.hash.slice(1)}`);
  if (fromHash) select(fromHash, false);
}

// ---------------------------------------------------------------- event rows

function describeBlob(blob) {
  return `${blob.$blob.type}, ${formatBytes(blob.$blob.size)}`;
}

// blobUrl refuses a blob that points anywhere but this server's files.
function safeBlobUrl(value) {
  try {
    return blobUrl(value, { base: BASE });
  } catch {
    return null;
  }
}

function renderScalar(value, label) {
  if (isBlob(value)) {
    const src = safeBlobUrl(value);
    if (src === null) return el('span', { class: 'refused', text: `‹refused: ${describeBlob(value)} not a file here›` });
    if (value.$blob.type.startsWith('image/') && value.$blob.type !== 'image/svg+xml') {
      return el('img', {
        src,
        alt: `${label}: ${describeBlob(value)}`,
        title: describeBlob(value),
        decoding: 'async',
      });
    }
    return el('a', { href: src, download: '', text: describeBlob(value) });
  }
  if (typeof value === 'string') return document.createTextNode(value);
  return document.createTextNode(JSON.stringify(value, (_, v) => (isBlob(v) ? `‹${describeBlob(v)}›` : v)));
}

function renderData(data, label) {
  const box = el('div', { class: 'data' });
  if (data && typeof data === 'object' && !Array.isArray(data) && !isBlob(data)) {
    for (const [key, value] of Object.entries(data)) {
      box.append(
        el(
          'span',
          { class: 'kv', 'data-key': key },
          el('span', { class: 'key', text: key }),
          el('span', { class: 'value' }, renderScalar(value, `${label} ${key}`)),
        ),
      );
    }
  } else if (data !== null && data !== undefined) {
    box.append(el('span', { class: 'value' }, renderScalar(data, label)));
  }
  return box;
}

function eventRow(event) {
  let data = event.data;
  if (event.event === 'gap') {
    data = event.data?.restarted
      ? 'the server restarted: events before it are lost'
      : `missed ${event.data?.missed ?? '?'} events`;
  }
  if (event.event === 'error' && data && typeof data === 'object') data = `${data.type}: ${data.message}`;
  return el(
    'li',
    { 'data-id': event.id ?? '', 'data-event': event.event },
    el('span', { class: 'id', text: event.id ? `#${event.id}` : '', title: event.id || '' }),
    el('span', { class: 'type', text: event.event }),
    renderData(data, `event ${event.id}`),
  );
}

/** An event list that renders once a frame and keeps its last MAX_ROWS rows. */
class EventLog {
  constructor(list, note) {
    this.list = list;
    this.note = note;
    this.emptyText = note.textContent; // as the page says it before anything arrives
    this.pending = [];
    this.total = 0;
    this.scheduled = false;
  }

  clear() {
    this.pending = [];
    this.total = 0;
    this.list.replaceChildren();
    this.note.hidden = false;
    this.note.textContent = this.emptyText;
  }

  /** `make` builds the row: only when it is shown, so rows dropped unseen cost nothing. */
  add(make, counts = true) {
    if (counts) this.total += 1;
    this.pending.push(make);
    // Rows nobody will see are not kept: a fast stream in a hidden tab stays bounded.
    if (this.pending.length > 2 * MAX_ROWS) this.pending.splice(0, this.pending.length - MAX_ROWS);
    if (!this.scheduled) {
      this.scheduled = true;
      // Once a frame; a hidden tab gets no frames, so there a (throttled) timer does it.
      if (document.hidden) setTimeout(() => this.flush(), 50);
      else requestAnimationFrame(() => this.flush());
    }
  }

  flush() {
    this.scheduled = false;
    const list = this.list;
    // Follow new rows only when the reader is already at the bottom.
    const follow = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(...this.pending.slice(-MAX_ROWS).map((make) => make()));
    this.pending = [];
    const extra = list.children.length - MAX_ROWS;
    for (let i = 0; i < extra; i++) list.firstElementChild.remove();
    if (follow) list.scrollTop = list.scrollHeight;
    const hidden = this.total > list.querySelectorAll('li[data-event]').length;
    this.note.hidden = !hidden;
    this.note.textContent = hidden ? `Showing the last ${MAX_ROWS} of ${this.total} events.` : '';
  }
}

function marker(text) {
  return el('li', { class: 'marker', role: 'note', text });
}

function stateText(status) {
  switch (status.state) {
    case 'connecting':
      return 'connecting…';
    case 'open':
      return 'live';
    case 'reconnecting':
      return status.notice
        ? 'server unavailable, reconnecting…'
        : `reconnecting… (try ${status.attempt || 1})`;
    case 'closed':
      return status.last ? `ended: ${status.last.event}` : 'closed';
    case 'failed':
      return 'failed';
    default:
      return status.state;
  }
}

function setState(node, state, text) {
  node.dataset.state = state;
  node.textContent = text;
}

// ---------------------------------------------------------------- streams

const TRANSPORTS = {
  ndjson: { start: streamNdjson, label: 'NDJSON · Axios fetch' },
  sse: { start: streamSse, label: 'SSE · EventSource' },
  ws: { start: streamWs, label: 'WebSocket' },
};

function schemaType(prop) {
  if (prop.type) return Array.isArray(prop.type) ? prop.type.find((t) => t !== 'null') : prop.type;
  const options = prop.anyOf || prop.oneOf || [];
  const typed = options.find((o) => o.type && o.type !== 'null');
  return typed ? typed.type : 'json';
}

function paramField(name, prop, required) {
  const id = `param-${name}`;
  const type = schemaType(prop);
  const label = el('label', { for: id, text: prop.title || name });
  const hintId = `${id}-hint`;
  const hintText = [prop.description, required ? 'required' : null].filter(Boolean).join(' · ');
  const hint = hintText ? el('p', { class: 'hint', id: hintId, text: hintText }) : null;
  const common = { id, name, 'data-type': type, 'aria-describedby': hint ? hintId : null, required };
  let input;
  if (prop.enum) {
    input = el(
      'select',
      common,
      ...prop.enum.map((v) =>
        el('option', { value: String(v), text: String(v), selected: v === prop.default }),
      ),
    );
  } else if (type === 'boolean') {
    input = el('input', { ...common, type: 'checkbox', checked: Boolean(prop.default) });
    return el(
      'div',
      { class: 'field' },
      el('label', { class: 'check', for: id }, input, prop.title || name),
      hint,
    );
  } else if (type === 'integer' || type === 'number') {
    input = el('input', {
      ...common,
      type: 'number',
      inputmode: type === 'integer' ? 'numeric' : 'decimal',
      step: type === 'integer' ? '1' : 'any',
      min: prop.minimum ?? prop.exclusiveMinimum,
      max: prop.maximum ?? prop.exclusiveMaximum,
      value: prop.default ?? '',
    });
  } else if (type === 'string') {
    input = el('input', {
      ...common,
      type: 'text',
      value: prop.default ?? '',
      maxlength: prop.maxLength,
      minlength: prop.minLength,
    });
  } else {
    input = el('textarea', { ...common, rows: 2, placeholder: 'JSON' });
    input.value = prop.default === undefined ? '' : JSON.stringify(prop.default);
  }
  return el('div', { class: 'field' }, label, input, hint);
}

function readParams(fieldset) {
  const params = {};
  for (const input of fieldset.querySelectorAll('[data-type]')) {
    const type = input.dataset.type;
    if (type === 'boolean') {
      params[input.name] = input.checked;
      continue;
    }
    const raw = input.value.trim();
    if (raw === '') {
      if (input.required) throw new Error(`${input.name} is required`);
      continue;
    }
    if (!input.checkValidity()) throw new Error(`${input.name}: ${input.validationMessage}`);
    if (type === 'integer' || type === 'number') params[input.name] = Number(raw);
    else if (type === 'string' || input.tagName === 'SELECT') params[input.name] = raw;
    else {
      try {
        params[input.name] = JSON.parse(raw);
      } catch {
        throw new Error(`${input.name}: not valid JSON`);
      }
    }
  }
  return params;
}

function setupStreams() {
  const form = $('#stream-form');
  const select = $('#stream-name');
  const fieldset = $('#stream-params');
  const errorBox = $('#stream-error');
  const startButton = $('#start');
  const stopButton = $('#stop');
  const status = {
    transport: $('#st-transport'),
    state: $('#st-state'),
    run: $('#st-run'),
    events: $('#st-events'),
    last: $('#st-last'),
    reconnects: $('#st-reconnects'),
  };
  const log = new EventLog(
    $('#events'),
    $('#events-note'),
  );
  const now = { box: $('#now'), img: $('#now-img'), text: $('#now-text') };
  let streams = [];
  let current = null;

  const running = (on) => {
    startButton.disabled = on;
    stopButton.disabled = !on;
    for (const input of form.querySelectorAll('input, select, textarea')) input.disabled = on;
  };

  const showStream = () => {
    const stream = streams.find((s) => s.name === select.value);
    $('#stream-desc').textContent = stream?.description || '';
    const props = stream?.params?.properties || {};
    const required = new Set(stream?.params?.required || []);
    const legend = el('legend', { text: 'Parameters' });
    const fields = Object.entries(props).map(([name, prop]) => paramField(name, prop, required.has(name)));
    fieldset.replaceChildren(...(fields.length ? [legend, ...fields] : []));
  };

  const showLatest = (data) => {
    if (!data || typeof data !== 'object') return;
    const image = Object.values(data).find((v) => isBlob(v) && v.$blob.type.startsWith('image/'));
    const text = Object.values(data).find((v) => typeof v === 'string' || typeof v === 'number');
    if (!image && text === undefined) return;
    now.box.hidden = false;
    if (image) {
      now.img.src = safeBlobUrl(image) ?? '';
      now.img.alt = `latest image: ${describeBlob(image)}`;
    }
    now.img.hidden = !image;
    now.text.textContent = text ?? '';
  };

  select.addEventListener('change', showStream);

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    showError(errorBox, null);
    let params;
    try {
      params = readParams(fieldset);
    } catch (err) {
      return showError(errorBox, err);
    }
    const transport = form.elements.transport.value;
    log.clear();
    now.box.hidden = true;
    status.transport.textContent = TRANSPORTS[transport].label;
    status.run.textContent = '—';
    status.events.textContent = '0';
    status.last.textContent = '—';
    status.reconnects.textContent = '0';
    setState(status.state, 'connecting', 'connecting…');
    running(true);

    const token = {};
    current = { token, watch: null };
    const watch = TRANSPORTS[transport].start(select.value, params, {
      base: BASE,
      onEvent: (event) => {
        log.add(() => eventRow(event));
        status.events.textContent = String(log.total);
        status.last.textContent = event.id ?? '—';
        if (event.event === 'message') showLatest(event.data);
      },
      onStatus: (s) => {
        if (current?.token !== token) return; // a run this page no longer shows
        if (s.runId) status.run.textContent = s.runId;
        status.reconnects.textContent = String(s.reconnects);
        setState(status.state, s.state, stateText(s));
        if (s.state === 'reconnecting' && s.attempt === 1 && !s.notice) {
          log.add(() => marker(`Connection lost after #${s.lastId ?? '—'}; reconnecting…`), false);
        }
        if (s.state === 'open' && s.resumedAfter !== undefined) {
          log.add(
            () =>
              marker(`Reconnected (${s.reconnects}): resumed after #${s.resumedAfter ?? '—'}, nothing missed`),
            false,
          );
        }
        if (s.state === 'failed') showError(errorBox, s.error);
        if (s.state === 'closed' || s.state === 'failed') {
          running(false);
          startButton.focus();
        }
      },
    });
    current.watch = watch;
  });

  stopButton.addEventListener('click', async () => {
    if (!current?.watch) return;
    stopButton.disabled = true;
    setState(status.state, 'connecting', 'stopping…');
    try {
      await current.watch.stop();
    } catch (err) {
      showError(errorBox, err);
      running(false);
    }
  });

  $('#clear-events').addEventListener('click', () => {
    log.clear();
    now.box.hidden = true;
  });

  listStreams({ base: BASE }).then(
    (found) => {
      streams = found;
      select.replaceChildren(...streams.map((s) => el('option', { value: s.name, text: s.name })));
      if (!streams.length) {
        showError(errorBox, new Error('This server has no streams registered.'));
        startButton.disabled = true;
      }
      showStream();
    },
    (err) => showError(errorBox, err),
  );
}

// ---------------------------------------------------------------- channels

function setupChannels() {
  const form = $('#channel-form');
  const nameInput = $('#channel-name');
  const transportSelect = $('#channel-transport');
  const errorBox = $('#channel-error');
  const publishForm = $('#publish-form');
  const dataInput = $('#publish-data');
  const typeInput = $('#publish-event');
  const jsonBox = $('#publish-json');
  const publishError = $('#publish-error');
  const status = {
    name: $('#ch-name'),
    state: $('#ch-state'),
    count: $('#ch-count'),
    last: $('#ch-last'),
    reconnects: $('#ch-reconnects'),
  };
  const log = new EventLog(
    $('#messages'),
    $('#messages-note'),
  );
  const typesField = $('#channel-types-field');
  let sub = null;

  // Only EventSource needs to be told which event types to expect.
  const showTypes = () => {
    typesField.hidden = transportSelect.value !== 'sse';
  };
  transportSelect.addEventListener('change', showTypes);
  showTypes();

  const subscribed = (on) => {
    $('#subscribe').textContent = on ? 'Switch' : 'Subscribe';
    $('#unsubscribe').disabled = !on;
  };

  const validName = () => {
    if (nameInput.checkValidity()) return true;
    showError(
      errorBox,
      new Error('A channel name is 1-200 of A-Z a-z 0-9 . _ : - and starts with a letter or digit.'),
    );
    nameInput.focus();
    return false;
  };

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    showError(errorBox, null);
    if (!validName()) return;
    sub?.watch?.close();
    log.clear();
    const name = nameInput.value;
    status.name.textContent = name;
    status.count.textContent = '0';
    status.last.textContent = '—';
    setState(status.state, 'connecting', 'connecting…');
    const token = {};
    sub = { token, watch: null };
    const mine = subscribe(name, {
      base: BASE,
      transport: transportSelect.value,
      after: '0', // the retained history first
      types: $('#channel-types')
        .value.split(/[\s,]+/)
        .filter(Boolean),
      onEvent: (event) => {
        log.add(() => eventRow(event));
        status.count.textContent = String(log.total);
        status.last.textContent = event.id ?? '—';
      },
      onStatus: (s) => {
        if (sub?.token !== token) return;
        status.reconnects.textContent = String(s.reconnects);
        setState(status.state, s.state, stateText(s));
        if (s.state === 'open' && s.resumedAfter !== undefined) {
          log.add(() => marker(`Reconnected (${s.reconnects}): resumed after #${s.resumedAfter ?? '—'}`), false);
        }
        if (s.state === 'failed') showError(errorBox, s.error);
      },
    });
    sub.watch = mine;
    subscribed(true);
  });

  $('#unsubscribe').addEventListener('click', () => {
    sub?.watch?.close();
    sub = null;
    setState(status.state, 'idle', 'idle');
    subscribed(false);
  });

  publishForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    showError(publishError, null);
    if (!validName()) return;
    let data = dataInput.value;
    if (jsonBox.checked) {
      try {
        data = JSON.parse(data);
      } catch (err) {
        return showError(publishError, new Error(`Not valid JSON: ${err.message}`));
      }
    }
    const button = $('#publish');
    button.disabled = true;
    try {
      await publish(nameInput.value, data, { base: BASE, event: typeInput.value.trim() || undefined });
      dataInput.value = '';
      dataInput.focus();
    } catch (err) {
      showError(publishError, err);
    } finally {
      button.disabled = false;
    }
  });

  dataInput.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      publishForm.requestSubmit();
    }
  });
}

// ---------------------------------------------------------------- files

function setupFiles() {
  const drop = $('#drop');
  const input = $('#file-input');
  const uploads = $('#uploads');
  const body = $('#files-body');
  const note = $('#files-note');
  const more = $('#more-files');
  const errorBox = $('#files-error');
  const threshold = $('#opt-threshold');
  const chunk = $('#opt-chunk');
  let cursor = null;
  const showEmpty = () => {
    note.hidden = body.children.length > 0;
    $('.table-wrap').hidden = body.children.length === 0;
  };

  // In the MB the page shows sizes in (format.js), so that "over 16 MB" means what the list says.
  const options = () => ({
    resumableAbove: Math.max(0, Number(threshold.value) || 0) * MB,
    chunkSize: Math.max(64_000, Math.round((Number(chunk.value) || 8) * MB)),
  });
  threshold.addEventListener('input', () => {
    $('#threshold-label').textContent = formatBytes(options().resumableAbove);
  });

  // Explicit roles: on a phone the rows are laid out as cards (style.css), and a
  // table whose display is changed loses its table semantics in some browsers.
  const fileRow = (meta) =>
    el(
      'tr',
      { 'data-id': meta.id, role: 'row' },
      el(
        'td',
        { class: 'name', role: 'cell' },
        el('a', {
          href: fileUrl(meta.id, { base: BASE }),
          target: '_blank',
          rel: 'noopener',
          text: meta.name,
          title: meta.name,
        }),
      ),
      el('td', { class: 'num size', role: 'cell', text: formatBytes(meta.size) }),
      el('td', { class: 'wide type', role: 'cell', title: meta.type, text: meta.type }),
      el('td', { class: 'added num', role: 'cell', text: formatTime(meta.created) }),
      el('td', { class: 'wide hash', role: 'cell', title: meta.sha256, text: `${meta.sha256.slice(0, 8)}…` }),
      el(
        'td',
        { class: 'acts', role: 'cell' },
        el('a', {
          class: 'button download',
          href: fileUrl(meta.id, { base: BASE, download: true }),
          download: meta.name,
          'aria-label': `Download ${meta.name}`,
          text: 'Download',
        }),
        el('button', {
          type: 'button',
          class: 'small danger',
          'aria-label': `Delete ${meta.name}`,
          text: 'Delete',
          onclick: async (e) => {
            e.currentTarget.disabled = true;
            try {
              await deleteFile(meta.id, { base: BASE });
              e.target.closest('tr').remove();
              showEmpty();
            } catch (err) {
              showError(errorBox, err);
            }
          },
        }),
      ),
    );

  const loadFiles = async (append = false) => {
    showError(errorBox, null);
    try {
      const page = await listFiles({ base: BASE, limit: 50, cursor: append ? cursor : undefined });
      cursor = page.next;
      const rows = page.files.map(fileRow);
      if (append) body.append(...rows);
      else body.replaceChildren(...rows);
      showEmpty();
      more.hidden = !cursor;
    } catch (err) {
      showError(errorBox, err);
    }
  };

  // "7.0 MB of 25 MB (28%)": what the server has, which is where choosing the file again goes on from.
  const howFar = (u) => {
    if (u.gone) return `${formatBytes(u.size)}, no longer on the server: choosing it again starts over`;
    if (u.offset === null) return `${formatBytes(u.size)}, progress unknown (the server did not answer)`;
    // Rounded down: 100% only once every byte is there.
    const percent = u.size ? Math.floor((u.offset * 100) / u.size) : 100;
    return `${formatBytes(u.offset)} of ${formatBytes(u.size)} (${percent}%)`;
  };

  const showUnfinished = async () => {
    const list = await unfinishedUploads();
    $('#unfinished-list').replaceChildren(
      ...list.map((u) =>
        el(
          'li',
          { 'data-name': u.name },
          el('span', { class: 'unf-name', title: u.name, text: u.name }),
          el('progress', {
            max: u.size || 1,
            value: u.offset ?? 0,
            'aria-label': `How far the upload of ${u.name} got`,
          }),
          el('span', { class: 'unf-got', text: howFar(u) }),
          el('button', {
            type: 'button',
            class: 'small',
            'aria-label': `Forget the unfinished upload of ${u.name}`,
            text: 'Forget',
            onclick: async () => {
              await discardUpload(u);
              showUnfinished();
            },
          }),
        ),
      ),
    );
    $('#unfinished').hidden = list.length === 0;
  };

  const start = (file) => {
    const bar = el('progress', { max: 100, value: 0, 'aria-label': `Upload progress of ${file.name}` });
    const statusLine = el('div', { class: 'up-status', role: 'status', text: 'starting…' });
    const percent = el('span', { class: 'up-percent', text: '0%' });
    const cancel = el('button', {
      type: 'button',
      class: 'small',
      'aria-label': `Cancel the upload of ${file.name}`,
      text: 'Cancel',
    });
    const opts = options();
    let resumedAt = null;
    const job = upload(file, {
      base: BASE,
      ...opts,
      onProgress: ({ fraction }) => {
        const value = Math.floor(fraction * 1000) / 10;
        bar.value = value;
        percent.textContent = `${value.toFixed(value < 100 ? 1 : 0)}%`;
        if (fraction < 1)
          statusLine.textContent =
            resumedAt !== null ? `uploading, resumed at ${formatBytes(resumedAt)}` : 'uploading…';
        else statusLine.textContent = 'finishing…';
      },
      onResume: ({ offset }) => {
        resumedAt = offset;
        row.dataset.resumedAt = String(offset);
        statusLine.textContent = `resuming at ${formatBytes(offset)} (${Math.round((offset / file.size) * 100)}%)`;
      },
    });
    const row = el(
      'li',
      { class: 'upload', 'data-state': 'uploading', 'data-name': file.name, 'data-method': job.method },
      el(
        'div',
        { class: 'up-name', title: file.name },
        file.name,
        el('span', { class: 'badge', text: job.method === 'tus' ? 'tus' : 'Axios' }),
      ),
      el('div', { class: 'up-meta' }, percent, ` of ${formatBytes(file.size)} `, cancel),
      bar,
      statusLine,
    );
    uploads.prepend(row);
    cancel.addEventListener('click', () => {
      job.abort();
      row.dataset.state = 'failed';
      statusLine.textContent = 'cancelled';
      cancel.disabled = true;
    });
    job.done.then(
      (meta) => {
        row.dataset.state = 'done';
        row.dataset.fileId = meta.id;
        bar.value = 100;
        percent.textContent = '100%';
        statusLine.textContent = `stored · sha256 ${meta.sha256.slice(0, 16)}…`;
        cancel.remove();
        loadFiles();
        showUnfinished();
      },
      (err) => {
        if (row.dataset.state === 'failed') return; // cancelled
        row.dataset.state = 'failed';
        statusLine.textContent = `failed: ${err.message}`;
        cancel.remove();
      },
    );
  };

  const take = (files) => {
    for (const file of files) start(file);
  };

  input.addEventListener('change', () => {
    take([...input.files]);
    input.value = ''; // so that picking the same file again fires change
  });
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add('over');
    });
  }
  for (const type of ['dragleave', 'drop']) drop.addEventListener(type, () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    take([...e.dataTransfer.files]);
  });
  // A file dropped beside the zone must not make the browser leave the page.
  for (const type of ['dragover', 'drop']) window.addEventListener(type, (e) => e.preventDefault());

  $('#refresh-files').addEventListener('click', () => loadFiles());
  more.addEventListener('click', () => loadFiles(true));
  loadFiles();
  showUnfinished().catch((err) => showError(errorBox, err));
}

// ---------------------------------------------------------------- token

const TOKEN_KEY = 'tidewire.token';

/**
 * The access token: from `?token=` in the address (then removed from it, so
 * that it is neither bookmarked nor shared), else what this tab was given
 * before (sessionStorage, so it ends with the tab). Set before any request.
 */
function setupToken() {
  const address = new URL(location.href);
  const given = address.searchParams.get('token');
  if (given !== null) {
    address.searchParams.delete('token');
    history.replaceState(null, '', address.href);
    sessionStorage.setItem(TOKEN_KEY, given);
  }
  const input = $('#token-input');
  const box = $('#access');
  const use = (token) => {
    setToken(token || null);
    box.dataset.set = String(Boolean(token));
    input.value = token || '';
  };
  use(sessionStorage.getItem(TOKEN_KEY));
  $('#token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    // Every panel starts again with the new token: simplest is a reload.
    location.reload();
  });
  use(sessionStorage.getItem(TOKEN_KEY));
}

setupToken();
setupTabs();
setupStreams();
setupChannels();
setupFiles();
document.documentElement.dataset.ready = 'true';
