// app.js: the chat page's DOM and WebSocket glue. The logic it relies on (rooms, seq
// dedup, outbox, resume positions, backoff) lives in chat-core.js, without DOM.
//
// Security rules this file keeps: the session key never goes into a URL (it travels in
// the `auth` frame and is kept in sessionStorage so that a reload works); every text
// from the server or the user is put in the page with textContent, never as HTML.

import {
  ChatState,
  TypingThrottle,
  backoffDelay,
  formatTime,
  roomNameProblem,
  trimRoomName,
  typingSentence,
  utf8Length,
} from './chat-core.js';

/** @typedef {import('./chat-core.js').Message} Message */
/** @typedef {import('./chat-core.js').RoomState} RoomState */
/** @typedef {import('./chat-core.js').OutboxEntry} OutboxEntry */

/**
 * What a `ref` we sent stands for, so that the reply (or error) can be routed.
 * @typedef {{kind: 'auth'} | {kind: 'join', room: string, since: number | undefined}
 *   | JoinMany | {kind: 'leave', room: string} | {kind: 'send', clientMsgId: string}
 *   | {kind: 'older', room: string} | {kind: 'gap', room: string} | {kind: 'ping'}} RefInfo
 */

/**
 * One `join` naming several rooms (the rooms of a reconnect, in one frame: one frame each
 * would run into the server's rate limit). The server answers its rooms in order, each with
 * `joined` or an `error` (a room whose backfill failed after `joined`: `left`, then the
 * error), so an error is for the first room not yet answered. Kept until every room is.
 * @typedef {{kind: 'joins', rooms: {room: string, since: number | undefined}[], next: number,
 *   failed: string | null}} JoinMany
 */

/**
 * The connection's phase, as shown to the person.
 * @typedef {'connecting' | 'ready' | 'waiting' | 'auth_failed' | 'revoked' | 'no_key'} Phase
 */

const STORAGE_KEY = 'wschat.session';
/** The room a fresh page shows until `hello` names the session's (`default_room`). */
const DEFAULT_ROOM = 'general';
const HISTORY_PAGE = 50;
const PING_EVERY_MS = 20000;
/** A ping unanswered (no frame at all) this long means the connection is dead. */
const PING_TIMEOUT_MS = 15000;
const CONNECT_TIMEOUT_MS = 15000;
const STABLE_AFTER_MS = 10000;
const NOTICE_MS = 6000;
const NEAR_BOTTOM_PX = 48;
const NEAR_TOP_PX = 120;

/** Close codes after which reconnecting cannot help. */
const CLOSE_AUTH_FAILED = 4001;
const CLOSE_POLICY = 1008;
/** Error codes that answer a whole frame: a `join` so answered tried none of its rooms
 * (`too_many_rooms` too, when the join names more rooms than allowed). */
const WHOLE_FRAME_CODES = new Set(['rate_limited', 'invalid_frame', 'bad_json', 'unknown_type']);

// ---------------------------------------------------------------------------
// Elements

/** @param {string} id */
function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing element #${id}`);
  return el;
}

const els = {
  status: byId('status'),
  statusText: byId('status-text'),
  statusDetail: byId('status-detail'),
  reconnectNow: /** @type {HTMLButtonElement} */ (byId('reconnect-now')),
  roomList: byId('room-list'),
  joinForm: /** @type {HTMLFormElement} */ (byId('join-form')),
  joinInput: /** @type {HTMLInputElement} */ (byId('join-input')),
  roomTitle: byId('room-title'),
  scroller: byId('scroller'),
  historyStatus: byId('history-status'),
  loadOlder: /** @type {HTMLButtonElement} */ (byId('load-older')),
  historyText: byId('history-text'),
  messages: byId('messages'),
  typing: byId('typing'),
  notice: byId('notice'),
  composer: /** @type {HTMLFormElement} */ (byId('composer')),
  input: /** @type {HTMLTextAreaElement} */ (byId('message-input')),
  presenceTitle: byId('presence-title'),
  presenceList: byId('presence-list'),
};

// ---------------------------------------------------------------------------
// State

const state = new ChatState();
const typingThrottle = new TypingThrottle();

/** The session key, in memory (and sessionStorage, for reloads). @type {string | null} */
let sessionKey = null;
/** The one room this session may use, from `hello`. @type {string | null} */
let sessionRoom = null;
/** The room list was guessed before any `hello` (fresh page, server unreachable). */
let provisionalRoom = false;
/** Server limits, from `hello`. */
let limits = { max_message_bytes: 4096, max_history_page: HISTORY_PAGE, max_rooms_per_connection: 50 };

const conn = {
  /** @type {WebSocket | null} */
  ws: null,
  /** @type {Phase} */
  phase: 'connecting',
  /** Reconnect attempts since the last stable connection. */
  attempt: 0,
  /** When the scheduled reconnect happens (ms). */
  retryAt: 0,
  /** When the current connection got its `hello` (ms), 0 if it has not. */
  readySince: 0,
  /** When the last frame arrived (ms). */
  lastFrameAt: 0,
  /** When the last ping went out (ms), 0 if none on this connection. */
  pingSentAt: 0,
  /** The server refused our key on this connection. */
  authRefused: false,
  /** @type {ReturnType<typeof setTimeout> | undefined} */ retryTimer: undefined,
  /** @type {ReturnType<typeof setInterval> | undefined} */ countdownTimer: undefined,
  /** @type {ReturnType<typeof setInterval> | undefined} */ pingTimer: undefined,
  /** @type {ReturnType<typeof setTimeout> | undefined} */ connectTimer: undefined,
  /** @type {ReturnType<typeof setTimeout> | undefined} */ outboxTimer: undefined,
};

let nextRef = 1;
/** @type {ReturnType<typeof setTimeout> | undefined} the pending `rejoinSoon` */
let rejoinTimer;
/** @type {Map<number, RefInfo>} */
const refs = new Map();

// ---------------------------------------------------------------------------
// Session key and sessionStorage

/** @returns {Record<string, unknown> | null} */
function loadSaved() {
  try {
    const v = JSON.parse(sessionStorage.getItem(STORAGE_KEY) ?? 'null');
    return v && typeof v === 'object' ? v : null;
  } catch {
    return null;
  }
}

function persist() {
  try {
    if (sessionKey === null) {
      sessionStorage.removeItem(STORAGE_KEY);
      return;
    }
    sessionStorage.setItem(
      STORAGE_KEY,
      JSON.stringify({
        key: sessionKey,
        rooms: provisionalRoom ? [] : [...state.rooms.keys()],
        current: provisionalRoom ? null : state.current,
        outbox: state.outbox.toJSON(),
      }),
    );
  } catch {
    // Storage disabled or full: the page still works until it is reloaded.
  }
}

/** Take the key from the address bar, remove it from there, restore a saved session. */
function initSession() {
  const url = new URL(window.location.href);
  const urlKey = url.searchParams.get('session_key');
  if (urlKey !== null) {
    url.searchParams.delete('session_key');
    history.replaceState(history.state, '', url.pathname + url.search + url.hash);
  }
  const saved = loadSaved();
  const savedKey = saved && typeof saved.key === 'string' ? saved.key : null;
  sessionKey = urlKey || savedKey;
  if (saved && sessionKey !== null && savedKey === sessionKey) {
    if (Array.isArray(saved.rooms)) {
      for (const name of saved.rooms) if (typeof name === 'string' && !roomNameProblem(name)) state.ensureRoom(name);
    }
    if (typeof saved.current === 'string' && state.rooms.has(saved.current)) state.switchTo(saved.current);
    state.outbox.restore(saved.outbox);
  }
  if (state.rooms.size === 0) {
    // Until `hello` says otherwise, assume the default room, so that the person can
    // write even when the server cannot be reached yet.
    state.ensureRoom(DEFAULT_ROOM);
    provisionalRoom = true;
  }
  if (state.current === null) state.switchTo([...state.rooms.keys()][0]);
  persist();
}

// ---------------------------------------------------------------------------
// Connection

function wsUrl() {
  const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${window.location.host}/ws`;
}

/**
 * @param {RefInfo} info
 * @returns {number}
 */
function newRef(info) {
  const ref = nextRef++;
  refs.set(ref, info);
  return ref;
}

/**
 * What `ref` stands for, left in place (a join naming several rooms is answered room by
 * room).
 * @param {unknown} ref
 * @returns {RefInfo | undefined}
 */
function peekRef(ref) {
  return typeof ref === 'number' ? refs.get(ref) : undefined;
}

/**
 * @param {unknown} ref
 * @returns {RefInfo | null}
 */
function takeRef(ref) {
  if (typeof ref !== 'number') return null;
  const info = refs.get(ref) ?? null;
  refs.delete(ref);
  return info;
}

/**
 * @param {object} frame
 * @returns {boolean} whether it went on the wire
 */
function send(frame) {
  const ws = conn.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(frame));
  return true;
}

function clearConnTimers() {
  clearTimeout(conn.retryTimer);
  clearInterval(conn.countdownTimer);
  clearInterval(conn.pingTimer);
  clearTimeout(conn.connectTimer);
  clearTimeout(conn.outboxTimer);
  conn.retryTimer = conn.countdownTimer = conn.pingTimer = conn.connectTimer = conn.outboxTimer = undefined;
}

/** @param {Phase} phase */
function setPhase(phase) {
  const changed = conn.phase !== phase;
  conn.phase = phase;
  renderStatus();
  renderComposerHint();
  // Pending messages say whether they wait for the connection.
  if (changed) scheduleRender({ messages: true });
}

function connect() {
  clearConnTimers();
  if (sessionKey === null) {
    setPhase('no_key');
    return;
  }
  conn.authRefused = false;
  conn.readySince = 0;
  setPhase('connecting');
  /** @type {WebSocket} */
  let ws;
  try {
    ws = new WebSocket(wsUrl());
  } catch {
    scheduleReconnect();
    return;
  }
  conn.ws = ws;
  conn.connectTimer = setTimeout(() => {
    if (conn.ws === ws && conn.phase === 'connecting') dropSocket();
  }, CONNECT_TIMEOUT_MS);
  ws.addEventListener('open', () => {
    if (conn.ws !== ws) return;
    conn.lastFrameAt = Date.now();
    send({ type: 'auth', key: sessionKey, ref: newRef({ kind: 'auth' }) });
  });
  ws.addEventListener('message', (ev) => {
    if (conn.ws === ws) onFrameText(ev.data);
  });
  ws.addEventListener('close', (ev) => {
    if (conn.ws !== ws) return;
    conn.ws = null;
    onClosed(ev.code, ev.reason);
  });
  // An `error` event is always followed by `close`, which does the work.
}

/** Give up on the current socket now (silent server, stuck handshake) and reconnect. */
function dropSocket() {
  const ws = conn.ws;
  conn.ws = null;
  if (ws) {
    try {
      ws.close(4000, 'client timeout');
    } catch {
      // Already closing.
    }
  }
  onClosed(1006);
}

/**
 * @param {number} code the close code
 * @param {string} [reason] the close reason
 */
function onClosed(code, reason = '') {
  const wasStable = conn.readySince > 0 && Date.now() - conn.readySince >= STABLE_AFTER_MS;
  clearConnTimers();
  // The next connection joins every room; a re-join timer of this one would only take
  // the place of one it needs.
  clearTimeout(rejoinTimer);
  rejoinTimer = undefined;
  refs.clear();
  state.disconnected();
  conn.readySince = 0;
  if (conn.authRefused || code === CLOSE_AUTH_FAILED) {
    authFailed();
  } else if (code === CLOSE_POLICY && reason !== 'rate limit exceeded') {
    // Revoked or expired; the rate limit's 1008 is a burst of ours, worth another try.
    setPhase('revoked');
  } else {
    if (wasStable) conn.attempt = 0;
    scheduleReconnect();
  }
  renderAll();
}

function authFailed() {
  clearConnTimers();
  const ws = conn.ws;
  conn.ws = null;
  if (ws) ws.close(1000, 'authentication failed');
  // A refused key is of no use after a reload either.
  sessionKey = null;
  persist();
  setPhase('auth_failed');
}

function scheduleReconnect() {
  clearConnTimers();
  const delay = backoffDelay(conn.attempt);
  conn.attempt += 1;
  conn.retryAt = Date.now() + delay;
  conn.retryTimer = setTimeout(connect, delay);
  conn.countdownTimer = setInterval(renderStatus, 1000);
  setPhase('waiting');
}

function reconnectNow() {
  if (conn.phase === 'waiting') connect();
}

/**
 * Ping now and then; a ping that gets no frame back in time means a dead connection
 * (browsers can take minutes to notice one). Judged from the ping's own send time, so
 * that timers throttled in a background tab do not make a live connection look dead.
 */
function startPing() {
  clearInterval(conn.pingTimer);
  conn.pingSentAt = 0;
  conn.pingTimer = setInterval(checkPing, PING_EVERY_MS);
}

function checkPing() {
  const now = Date.now();
  if (conn.pingSentAt > 0 && conn.lastFrameAt < conn.pingSentAt) {
    if (now - conn.pingSentAt > PING_TIMEOUT_MS) dropSocket();
    return;
  }
  conn.pingSentAt = now;
  send({ type: 'ping', ref: newRef({ kind: 'ping' }) });
  setTimeout(() => {
    if (conn.pingSentAt === now && conn.lastFrameAt < now && conn.phase === 'ready') checkPing();
  }, PING_TIMEOUT_MS + 1000);
}

// ---------------------------------------------------------------------------
// Frames from the server

/** @param {unknown} data */
function onFrameText(data) {
  conn.lastFrameAt = Date.now();
  if (typeof data !== 'string') return;
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    return;
  }
  if (!frame || typeof frame !== 'object' || typeof frame.type !== 'string') return;
  const handler = Object.hasOwn(handlers, frame.type) ? handlers[frame.type] : undefined;
  if (handler) handler(frame);
}

/**
 * @param {any} m
 * @returns {m is Message}
 */
function isMessage(m) {
  return (
    m !== null &&
    typeof m === 'object' &&
    typeof m.room === 'string' &&
    Number.isSafeInteger(m.seq) &&
    typeof m.user === 'string' &&
    typeof m.text === 'string' &&
    typeof m.time === 'string'
  );
}

/** @type {Record<string, (f: any) => void>} */
const handlers = {
  hello(f) {
    takeRef(f.ref);
    clearTimeout(conn.connectTimer);
    state.self = typeof f.user === 'string' ? f.user : null;
    if (f.limits && typeof f.limits === 'object') limits = { ...limits, ...f.limits };
    conn.readySince = Date.now();
    applySessionRoom(
      typeof f.session_room === 'string' ? f.session_room : null,
      typeof f.default_room === 'string' ? f.default_room : null,
    );
    setPhase('ready');
    sendJoins([...state.rooms.values()]);
    flushOutbox();
    startPing();
    persist();
    renderAll();
  },

  joined(f) {
    const pending = peekRef(f.ref);
    const info = pending?.kind === 'joins' ? joinAnswered(f.ref, f.room) : takeRef(f.ref);
    const room = state.room(f.room);
    if (!room) return;
    const since = info && info.kind === 'join' ? info.since : room.resumeSince;
    room.onJoined(Number(f.last_seq) || 0, since);
    scheduleRender({ rooms: true, messages: f.room === state.current });
  },

  message(f) {
    if (!isMessage(f)) return;
    const r = state.onMessage(f);
    if (!r) return;
    if (r.gap) fillGap(r.room);
    if (f.room === state.current) scheduleRender({ messages: true, typing: true });
    else if (r.added) scheduleRender({ rooms: true });
  },

  ack(f) {
    takeRef(f.ref);
    if (typeof f.room !== 'string' || !Number.isSafeInteger(f.seq)) return;
    state.onAck(f);
    persist();
    if (f.room === state.current) scheduleRender({ messages: true });
  },

  history(f) {
    const info = takeRef(f.ref);
    const room = state.room(f.room);
    if (!room) return;
    const msgs = Array.isArray(f.messages) ? f.messages.filter(isMessage).filter((m) => m.room === f.room) : [];
    if (info && info.kind === 'gap') {
      if (room.addGapFill(msgs) > 0) fillGap(room);
    } else {
      room.addOlder(msgs, f.has_more === true);
    }
    if (f.room === state.current) scheduleRender({ messages: true });
  },

  reset(f) {
    const room = state.onReset(f.room);
    if (room && f.room === state.current) scheduleRender({ messages: true, rebuild: true });
  },

  presence(f) {
    const room = state.room(f.room);
    if (!room || !Array.isArray(f.users)) return;
    room.setPresence(f.users.filter((u) => typeof u === 'string'));
    if (f.room === state.current) scheduleRender({ presence: true });
  },

  presence_diff(f) {
    const room = state.room(f.room);
    if (!room) return;
    const strings = (/** @type {unknown} */ v) => (Array.isArray(v) ? v.filter((u) => typeof u === 'string') : []);
    room.applyPresenceDiff(strings(f.joined), strings(f.left));
    if (f.room === state.current) scheduleRender({ presence: true });
  },

  typing(f) {
    const room = state.room(f.room);
    if (!room || typeof f.user !== 'string' || f.user === state.self) return;
    room.noteTyping(f.user, Date.now());
    if (f.room === state.current) renderTyping();
  },

  left(f) {
    const many = peekRef(f.ref);
    if (many?.kind === 'joins') {
      // The error that follows is this room's.
      many.failed = typeof f.room === 'string' ? f.room : null;
      const room = state.room(f.room);
      if (room) {
        room.joined = false;
        room.joining = false;
      }
      scheduleRender({ rooms: true });
      return;
    }
    const info = takeRef(f.ref);
    if (info?.kind === 'leave') return;
    // Not asked for: the server undid a join it could not finish (the store failed
    // during the backfill). The `error` that follows carries the join's ref: routed as a
    // join's refusal, it tries the join again.
    const room = state.room(f.room);
    if (!room) return;
    room.joined = false;
    room.joining = false;
    if (typeof f.ref === 'number') refs.set(f.ref, { kind: 'join', room: room.name, since: room.resumeSince });
    rejoinSoon();
    scheduleRender({ rooms: true });
  },

  pong(f) {
    takeRef(f.ref);
  },

  error(f) {
    const code = typeof f.code === 'string' ? f.code : 'internal';
    const text = typeof f.message === 'string' && f.message ? f.message : code;
    if (code !== 'auth_failed' && joinManyRefused(f.ref, code, text)) return;
    const info = takeRef(f.ref);
    if (code === 'auth_failed') {
      conn.authRefused = true;
      authFailed();
      return;
    }
    if (info?.kind === 'auth') {
      // Not a verdict on the key (e.g. the server is shutting down): try again later.
      dropSocket();
      return;
    }
    if (!info) {
      if (code !== 'rate_limited') showNotice(`Server: ${text}`);
      return;
    }
    switch (info.kind) {
      case 'send': {
        const r = state.outbox.refuse(info.clientMsgId, code, text, Date.now());
        if (r && !r.retry) showNotice(`Message not sent: ${text}`);
        scheduleOutbox();
        persist();
        scheduleRender({ messages: true });
        break;
      }
      case 'join':
        joinRefused(info.room, code, text);
        break;
      case 'older':
      case 'gap': {
        const room = state.room(info.room);
        if (room) {
          room.loadingOlder = info.kind === 'older' ? false : room.loadingOlder;
          room.fillingGap = info.kind === 'gap' ? false : room.fillingGap;
          if (code === 'not_joined' && info.kind === 'older') room.hasMore = null;
        }
        scheduleRender({ messages: true });
        break;
      }
      default:
        break;
    }
  },
};

/**
 * `hello` named the session's room, or did not. A restricted session shows only its room;
 * what was written before we knew goes to that room. Otherwise a page whose room was only
 * a guess starts in the session's default room (`default_room`), where the session's
 * legacy clients are.
 * @param {string | null} name  `session_room`
 * @param {string | null} fallback  `default_room`
 */
function applySessionRoom(name, fallback) {
  sessionRoom = name;
  if (name !== null) {
    for (const e of state.outbox.entries) {
      if (e.room !== name && (provisionalRoom || e.state !== 'failed')) e.room = name;
    }
    for (const other of [...state.rooms.keys()]) if (other !== name) state.removeRoom(other);
    state.ensureRoom(name);
    state.switchTo(name);
    rebuildMessages();
  } else if (provisionalRoom && fallback !== null && fallback !== DEFAULT_ROOM) {
    // The room was guessed before any `hello`: the session's own (where its legacy
    // clients are, nodejschat's room) takes its place, with what was written meanwhile.
    for (const e of state.outbox.entries) if (e.room === DEFAULT_ROOM) e.room = fallback;
    const wasCurrent = state.current === DEFAULT_ROOM;
    state.removeRoom(DEFAULT_ROOM);
    state.ensureRoom(fallback);
    if (wasCurrent || state.current === null) state.switchTo(fallback);
    rebuildMessages();
  } else if (state.rooms.size === 0) {
    state.switchTo(fallback ?? DEFAULT_ROOM);
  }
  provisionalRoom = false;
}

/**
 * @param {string} name
 * @param {string} code
 * @param {string} text
 */
function joinRefused(name, code, text) {
  const room = state.room(name);
  if (!room) return;
  room.joining = false;
  if (code === 'bad_since') {
    // Our position is beyond what the server has (its store was replaced): start over.
    room.clear();
    sendJoin(room);
    scheduleRender({ messages: name === state.current, rebuild: true });
    return;
  }
  if (code === 'unavailable' || code === 'internal' || code === 'rate_limited') {
    rejoinSoon();
    return;
  }
  showNotice(`Could not join #${name}: ${text}`);
  if (name !== sessionRoom && state.rooms.size > 1) {
    state.removeRoom(name);
    persist();
    scheduleRender({ rooms: true, messages: true, rebuild: true, presence: true });
  }
}

/**
 * The `joined` for `room` answers a join naming several rooms: move past it there.
 * @param {unknown} ref
 * @param {unknown} room
 * @returns {{kind: 'join', room: string, since: number | undefined} | null} what a
 *   one-room join of it would have been
 */
function joinAnswered(ref, room) {
  const info = peekRef(ref);
  if (info?.kind !== 'joins') return null;
  const i = info.rooms.findIndex((r, n) => n >= info.next && r.room === room);
  if (i < 0) return null;
  info.next = i + 1;
  if (info.next >= info.rooms.length) refs.delete(/** @type {number} */ (ref));
  return { kind: 'join', ...info.rooms[i] };
}

/**
 * An `error` answering a join naming several rooms: the first room not yet answered (or
 * the one just told `left`) was refused.
 * @param {unknown} ref
 * @param {string} code
 * @param {string} text
 * @returns {boolean} whether it was such an error
 */
function joinManyRefused(ref, code, text) {
  const info = peekRef(ref);
  if (info?.kind !== 'joins') return false;
  // `too_many_rooms` also answers one room of a join (the connection full); the whole
  // frame only when it names more rooms than a connection may be in.
  const whole =
    code === 'too_many_rooms' ? info.rooms.length > limits.max_rooms_per_connection : WHOLE_FRAME_CODES.has(code);
  if (whole) {
    // The whole frame refused: none of its rooms was tried.
    refs.delete(/** @type {number} */ (ref));
    for (const { room } of info.rooms.slice(info.next)) {
      const r = state.room(room);
      if (r) r.joining = false;
    }
    if (code === 'rate_limited') rejoinSoon();
    else showNotice(`Could not join your rooms: ${text}`);
    return true;
  }
  let name = info.failed;
  info.failed = null;
  if (name === null) {
    name = info.rooms[info.next]?.room ?? null;
    info.next += 1;
  }
  if (info.next >= info.rooms.length) refs.delete(/** @type {number} */ (ref));
  if (name !== null) joinRefused(name, code, text);
  return true;
}

/**
 * Join `rooms` in as few frames as fit the server's frame cap (one room: as `sendJoin`),
 * the room in view first. Rooms past `max_rooms_per_connection` are given up, as the
 * server would refuse them.
 * @param {RoomState[]} rooms
 */
function sendJoins(rooms) {
  const ordered = [...rooms].sort((a, b) => Number(b.name === state.current) - Number(a.name === state.current));
  const max = limits.max_rooms_per_connection;
  const over = ordered.splice(Math.max(1, max));
  if (over.length > 0) {
    showNotice(`You can be in at most ${max} rooms: left ${over.map((r) => `#${r.name}`).join(', ')}.`);
    for (const r of over) if (r.name !== sessionRoom) state.removeRoom(r.name);
    persist();
    scheduleRender({ rooms: true, messages: true, rebuild: true, presence: true });
  }
  // The frame's envelope, then each room's entry and a comma.
  const cap = 2 * limits.max_message_bytes + 4096 - 64;
  /** @type {RoomState[][]} */
  const frames = [];
  let size = cap;
  for (const room of ordered) {
    const entry = utf8Length(JSON.stringify({ room: room.name, since: room.resumeSince ?? 0 })) + 1;
    if (size + entry > cap) {
      frames.push([]);
      size = 0;
    }
    frames[frames.length - 1].push(room);
    size += entry;
  }
  for (const frame of frames) {
    if (frame.length === 1) {
      sendJoin(frame[0]);
      continue;
    }
    const asked = frame.map((r) => ({ room: r.name, since: r.resumeSince }));
    const ref = newRef({ kind: 'joins', rooms: asked, next: 0, failed: null });
    const specs = asked.map(({ room, since }) => (since === undefined ? { room } : { room, since }));
    if (send({ type: 'join', rooms: specs, ref })) for (const r of frame) r.joining = true;
    else refs.delete(ref);
  }
}

/** Join, in a while, every room that is neither joined nor joining by then (one timer). */
function rejoinSoon() {
  if (rejoinTimer !== undefined) return;
  rejoinTimer = setTimeout(() => {
    rejoinTimer = undefined;
    if (conn.phase !== 'ready') return;
    sendJoins([...state.rooms.values()].filter((r) => !r.joined && !r.joining));
  }, 2000);
}

/** @param {RoomState} room */
function sendJoin(room) {
  const since = room.resumeSince;
  const spec = since === undefined ? { room: room.name } : { room: room.name, since };
  const ref = newRef({ kind: 'join', room: room.name, since });
  if (send({ type: 'join', rooms: [spec], ref })) room.joining = true;
  else refs.delete(ref);
}

/**
 * Ask for missing seqs above the room's resume position, a page at a time.
 * @param {RoomState} room
 */
function fillGap(room) {
  if (room.fillingGap || room.lastContiguous === null || conn.phase !== 'ready') return;
  const newest = room.newestSeq;
  if (newest === null || newest <= room.lastContiguous + 1) return;
  const from = room.lastContiguous + 1;
  const page = Math.max(1, Math.min(HISTORY_PAGE, limits.max_history_page || HISTORY_PAGE));
  const before = Math.min(newest, from + page);
  room.fillingGap = true;
  send({
    type: 'history',
    room: room.name,
    before_seq: before,
    limit: before - from,
    ref: newRef({ kind: 'gap', room: room.name }),
  });
}

function loadOlder() {
  const room = state.current === null ? null : state.room(state.current);
  if (!room || conn.phase !== 'ready' || !room.canLoadOlder()) return;
  room.loadingOlder = true;
  const page = Math.max(1, Math.min(HISTORY_PAGE, limits.max_history_page || HISTORY_PAGE));
  const before = room.olderBeforeSeq();
  /** @type {Record<string, unknown>} */
  const frame = { type: 'history', room: room.name, limit: page, ref: newRef({ kind: 'older', room: room.name }) };
  if (before !== undefined) frame.before_seq = before;
  send(frame);
  renderHistoryStatus();
}

// ---------------------------------------------------------------------------
// Outbox

function flushOutbox() {
  clearTimeout(conn.outboxTimer);
  conn.outboxTimer = undefined;
  if (conn.phase !== 'ready') return;
  for (const e of state.outbox.takeDue(Date.now())) {
    const ref = newRef({ kind: 'send', clientMsgId: e.clientMsgId });
    if (!send({ type: 'send', room: e.room, text: e.text, client_msg_id: e.clientMsgId, ref })) {
      refs.delete(ref);
    }
  }
  scheduleOutbox();
  scheduleRender({ messages: true });
}

function scheduleOutbox() {
  if (conn.phase !== 'ready') return;
  const next = state.outbox.nextRetryAt();
  clearTimeout(conn.outboxTimer);
  conn.outboxTimer = next === null ? undefined : setTimeout(flushOutbox, Math.max(0, next - Date.now()));
}

function submitMessage() {
  const text = els.input.value;
  if (text.trim() === '') return;
  if (state.current === null) {
    showNotice('Join a room first.');
    return;
  }
  const bytes = utf8Length(text);
  if (bytes > limits.max_message_bytes) {
    showNotice(`Message is too long: ${bytes} bytes, at most ${limits.max_message_bytes}.`);
    return;
  }
  // JSON escapes control characters six bytes each: a frame over the server's cap would
  // close the connection (1009), and the retry after the reconnect close it again.
  const frame = { type: 'send', room: state.current, text, client_msg_id: 'x'.repeat(64), ref: 2 ** 53 };
  if (utf8Length(JSON.stringify(frame)) > 2 * limits.max_message_bytes + 4096) {
    showNotice('Message is too long once encoded: it has too many control characters.');
    return;
  }
  state.outbox.add(state.current, text, Date.now());
  typingThrottle.reset(state.current);
  els.input.value = '';
  autoGrow();
  persist();
  scheduleRender({ messages: true, bottom: true });
  flushOutbox();
}

// ---------------------------------------------------------------------------
// Rooms

/** @param {string} name */
function switchRoom(name) {
  if (!state.rooms.has(name)) return;
  state.switchTo(name);
  persist();
  scheduleRender({ rooms: true, messages: true, rebuild: true, presence: true, typing: true });
}

/** @param {string} raw */
function joinRoom(raw) {
  const name = trimRoomName(raw);
  const problem = roomNameProblem(name);
  if (problem) {
    showNotice(problem);
    return false;
  }
  if (state.rooms.has(name)) {
    switchRoom(name);
    return true;
  }
  if (sessionRoom !== null) {
    showNotice(`This session can only use #${sessionRoom}.`);
    return false;
  }
  if (state.rooms.size >= limits.max_rooms_per_connection) {
    showNotice(`You can be in at most ${limits.max_rooms_per_connection} rooms; leave one first.`);
    return false;
  }
  const room = state.ensureRoom(name);
  if (conn.phase === 'ready') sendJoin(room);
  switchRoom(name);
  return true;
}

/** @param {string} name */
function leaveRoom(name) {
  const room = state.room(name);
  if (!room || name === sessionRoom) return;
  if (room.joined || room.joining) send({ type: 'leave', room: name, ref: newRef({ kind: 'leave', room: name }) });
  state.removeRoom(name);
  persist();
  scheduleRender({ rooms: true, messages: true, rebuild: true, presence: true, typing: true });
}

// ---------------------------------------------------------------------------
// Rendering

/** @type {{rooms: boolean, messages: boolean, rebuild: boolean, presence: boolean, typing: boolean, bottom: boolean}} */
const dirty = { rooms: false, messages: false, rebuild: false, presence: false, typing: false, bottom: false };
/** @type {ReturnType<typeof setTimeout> | undefined} */
let renderTimer;

/**
 * Render soon, once for a burst of frames.
 * @param {Partial<typeof dirty>} what
 */
function scheduleRender(what) {
  for (const k of /** @type {(keyof typeof dirty)[]} */ (Object.keys(what))) if (what[k]) dirty[k] = true;
  if (renderTimer === undefined) renderTimer = setTimeout(flushRender, 16);
}

function flushRender() {
  renderTimer = undefined;
  const d = { ...dirty };
  for (const k of /** @type {(keyof typeof dirty)[]} */ (Object.keys(dirty))) dirty[k] = false;
  if (d.rooms) renderRooms();
  if (d.rebuild) rebuildMessages();
  if (d.messages || d.rebuild) renderMessages(d.bottom || d.rebuild);
  if (d.presence) renderPresence();
  if (d.typing) renderTyping();
  renderTitle();
}

function renderAll() {
  scheduleRender({ rooms: true, messages: true, presence: true, typing: true });
  renderStatus();
  renderComposerHint();
}

function renderStatus() {
  els.status.dataset.state = conn.phase;
  let text = '';
  let detail = '';
  switch (conn.phase) {
    case 'connecting':
      text = 'Connecting…';
      break;
    case 'ready':
      text = state.self ? `Connected as ${state.self}` : 'Connected';
      break;
    case 'waiting': {
      const secs = Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
      text = 'Disconnected, reconnecting';
      detail = secs > 0 ? ` in ${secs} s` : '…';
      break;
    }
    case 'auth_failed':
      text = 'Authentication failed: this chat link is not valid any more.';
      break;
    case 'revoked':
      text = 'Session ended (revoked or expired). Open the chat again from its link.';
      break;
    case 'no_key':
      text = 'No session key: open the chat from the link you were given.';
      break;
  }
  if (els.statusText.textContent !== text) els.statusText.textContent = text;
  els.statusDetail.textContent = detail;
  els.reconnectNow.hidden = conn.phase !== 'waiting';
}

function renderComposerHint() {
  const room = state.current;
  let hint = room === null ? 'Join a room to write' : `Message #${room}`;
  if (room !== null && conn.phase !== 'ready') hint += ' (sent when reconnected)';
  els.input.placeholder = hint;
  const stopped = conn.phase === 'auth_failed' || conn.phase === 'revoked' || conn.phase === 'no_key';
  els.input.disabled = stopped || room === null;
}

function renderTitle() {
  const unread = state.totalUnread();
  const room = state.current === null ? '' : `#${state.current} · `;
  document.title = `${unread > 0 ? `(${unread}) ` : ''}${room}wschat`;
}

function renderRooms() {
  const restricted = sessionRoom !== null;
  els.joinForm.hidden = restricted;
  const items = [];
  for (const room of state.rooms.values()) {
    const li = document.createElement('li');
    li.className = 'room';
    if (room.name === state.current) li.classList.add('current');
    if (!room.joined) li.classList.add('not-joined');

    const open = document.createElement('button');
    open.type = 'button';
    open.className = 'room-open';
    open.dataset.action = 'switch';
    open.dataset.room = room.name;
    if (room.name === state.current) open.setAttribute('aria-current', 'true');
    const name = document.createElement('span');
    name.className = 'room-name';
    name.textContent = `#${room.name}`;
    open.append(name);
    if (room.unread > 0) {
      const badge = document.createElement('span');
      badge.className = 'badge';
      badge.textContent = room.unread > 99 ? '99+' : String(room.unread);
      badge.setAttribute('aria-label', `${room.unread} unread`);
      open.append(badge);
    }
    li.append(open);

    if (!restricted) {
      const leave = document.createElement('button');
      leave.type = 'button';
      leave.className = 'room-leave';
      leave.dataset.action = 'leave';
      leave.dataset.room = room.name;
      leave.setAttribute('aria-label', `Leave #${room.name}`);
      leave.title = `Leave #${room.name}`;
      leave.textContent = '×';
      li.append(leave);
    }
    items.push(li);
  }
  els.roomList.replaceChildren(...items);
  els.roomTitle.textContent = state.current === null ? 'No room' : `#${state.current}`;
  renderComposerHint();
}

/** Message elements of the room in view, by key ("s<seq>" or "p<client_msg_id>"). @type {Map<string, HTMLElement>} */
const shown = new Map();

function rebuildMessages() {
  shown.clear();
  els.messages.replaceChildren();
}

/**
 * Append a span with text to `el`.
 * @param {HTMLElement} el
 * @param {string} className
 * @param {string} text
 */
function span(el, className, text) {
  const s = document.createElement('span');
  s.className = className;
  s.textContent = text;
  el.append(s);
  return s;
}

/**
 * @param {string} user
 * @param {string | null} time
 * @returns {HTMLElement}
 */
function metaLine(user, time) {
  const meta = document.createElement('div');
  meta.className = 'meta';
  span(meta, 'user', user);
  if (time !== null) {
    const t = document.createElement('time');
    t.dateTime = time;
    t.textContent = formatTime(time);
    const d = new Date(time);
    if (!Number.isNaN(d.getTime())) t.title = d.toLocaleString();
    meta.append(t);
  }
  return meta;
}

/** @param {string} text */
function textBlock(text) {
  const body = document.createElement('div');
  body.className = 'text';
  body.textContent = text;
  return body;
}

/** @param {Message} msg */
function messageElement(msg) {
  const li = document.createElement('li');
  li.className = 'msg';
  li.dataset.seq = String(msg.seq);
  li.dataset.room = msg.room;
  const meta = metaLine(msg.user, msg.time);
  if (state.self !== null && msg.user === state.self) {
    li.classList.add('own');
    const st = span(meta, 'state sent', '✓ sent');
    st.setAttribute('aria-label', 'sent');
  }
  li.append(meta, textBlock(msg.text));
  return li;
}

/** @param {OutboxEntry} entry */
function pendingState(entry) {
  if (entry.state === 'failed') return `failed: ${entry.error ?? 'not sent'}`;
  if (conn.phase !== 'ready') return 'waiting for connection…';
  if (entry.state === 'queued' && entry.retryAt > Date.now()) return 'retrying soon…';
  return 'sending…';
}

/**
 * @param {OutboxEntry} entry
 * @param {HTMLElement | undefined} el an earlier element for this entry, to update
 */
function pendingElement(entry, el) {
  const label = pendingState(entry);
  const look = `${entry.state}|${label}`;
  if (el && el.dataset.look === look) return el;
  const li = el ?? document.createElement('li');
  li.className = `msg own pending${entry.state === 'failed' ? ' failed' : ''}`;
  li.dataset.clientMsgId = entry.clientMsgId;
  li.dataset.room = entry.room;
  li.dataset.look = look;
  const meta = metaLine(state.self ?? 'you', null);
  span(meta, 'state', label);
  const parts = [meta, textBlock(entry.text)];
  if (entry.state === 'failed') {
    const actions = document.createElement('div');
    actions.className = 'actions';
    for (const [action, text] of [
      ['retry', 'Retry'],
      ['discard', 'Delete'],
    ]) {
      const b = document.createElement('button');
      b.type = 'button';
      b.dataset.action = action;
      b.dataset.id = entry.clientMsgId;
      b.textContent = text;
      actions.append(b);
    }
    parts.push(actions);
  }
  li.replaceChildren(...parts);
  return li;
}

/**
 * The first message element at least partly visible, and its offset from the top of the
 * scroller, so that the view can be held still while older messages go in above it.
 */
function scrollAnchor() {
  const top = els.scroller.getBoundingClientRect().top;
  for (const el of els.messages.children) {
    const r = el.getBoundingClientRect();
    if (r.bottom > top) return { el, offset: r.top - top };
  }
  return null;
}

/**
 * Bring the message list of the room in view in line with the state: each message
 * once, in seq order, then the unacknowledged ones.
 * @param {boolean} toBottom scroll to the newest message whatever the position
 */
function renderMessages(toBottom) {
  const sc = els.scroller;
  const atBottom = sc.scrollHeight - sc.scrollTop - sc.clientHeight < NEAR_BOTTOM_PX;
  const anchor = atBottom || toBottom ? null : scrollAnchor();

  const room = state.current === null ? null : state.room(state.current);
  /** @type {[string, () => HTMLElement][]} */
  const wanted = [];
  if (room) {
    for (const msg of room.messages()) {
      const key = `s${msg.seq}`;
      wanted.push([key, () => shown.get(key) ?? messageElement(msg)]);
    }
    for (const entry of state.outbox.visibleFor(room.name)) {
      const key = `p${entry.clientMsgId}`;
      wanted.push([key, () => pendingElement(entry, shown.get(key))]);
    }
  }
  const keep = new Set(wanted.map(([k]) => k));
  for (const [key, el] of shown) {
    if (!keep.has(key)) {
      el.remove();
      shown.delete(key);
    }
  }
  let cursor = els.messages.firstElementChild;
  for (const [key, make] of wanted) {
    const el = make();
    shown.set(key, el);
    if (el === cursor) cursor = cursor.nextElementSibling;
    else els.messages.insertBefore(el, cursor);
  }
  while (cursor) {
    const next = cursor.nextElementSibling;
    cursor.remove();
    cursor = next;
  }

  if (atBottom || toBottom) {
    sc.scrollTop = sc.scrollHeight;
  } else if (anchor && anchor.el.isConnected) {
    const now = anchor.el.getBoundingClientRect().top - sc.getBoundingClientRect().top;
    sc.scrollTop += now - anchor.offset;
  }
  renderHistoryStatus();
  // Not enough messages to scroll: fetch older ones until there are.
  if (room && sc.scrollHeight <= sc.clientHeight + 8 && room.canLoadOlder()) loadOlder();
}

function renderHistoryStatus() {
  const room = state.current === null ? null : state.room(state.current);
  let text = '';
  let button = false;
  if (room) {
    if (room.loadingOlder) text = 'Loading older messages…';
    else if (room.canLoadOlder()) button = true;
    else if (room.joined && room.seqs.length === 0 && state.outbox.visibleFor(room.name).length === 0) {
      text = room.lastSeqAtJoin === 0 ? 'No messages yet. Say hello!' : '';
    } else if (room.hasMore === false || room.oldestSeq === 1) text = `This is the start of #${room.name}.`;
  }
  els.loadOlder.hidden = !button;
  els.historyText.textContent = text;
}

function renderPresence() {
  const room = state.current === null ? null : state.room(state.current);
  const users = room ? [...room.presence].sort((a, b) => a.localeCompare(b)) : [];
  els.presenceTitle.textContent = `Online (${users.length})`;
  els.presenceList.replaceChildren(
    ...users.map((u) => {
      const li = document.createElement('li');
      li.textContent = u;
      if (u === state.self) span(li, 'you', ' (you)');
      return li;
    }),
  );
}

/** @type {ReturnType<typeof setInterval> | undefined} */
let typingTimer;

function renderTyping() {
  const room = state.current === null ? null : state.room(state.current);
  const users = room ? room.typingUsers(Date.now()) : [];
  const text = typingSentence(users);
  if (els.typing.textContent !== text) els.typing.textContent = text;
  // Re-check once a second while someone types, so that notices expire.
  if (users.length > 0 && typingTimer === undefined) typingTimer = setInterval(renderTyping, 1000);
  if (users.length === 0 && typingTimer !== undefined) {
    clearInterval(typingTimer);
    typingTimer = undefined;
  }
}

/** @type {ReturnType<typeof setTimeout> | undefined} */
let noticeTimer;

/** @param {string} text */
function showNotice(text) {
  els.notice.textContent = text;
  els.notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    els.notice.hidden = true;
    els.notice.textContent = '';
  }, NOTICE_MS);
}

function autoGrow() {
  const ta = els.input;
  ta.style.height = 'auto';
  ta.style.height = `${Math.min(ta.scrollHeight, 160)}px`;
}

// ---------------------------------------------------------------------------
// Events

function bindEvents() {
  els.composer.addEventListener('submit', (ev) => {
    ev.preventDefault();
    submitMessage();
    els.input.focus();
  });

  els.input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
      ev.preventDefault();
      submitMessage();
    }
  });

  els.input.addEventListener('input', () => {
    autoGrow();
    const room = state.current === null ? null : state.room(state.current);
    if (!room || !room.joined || conn.phase !== 'ready' || els.input.value.trim() === '') return;
    if (typingThrottle.shouldSend(room.name, Date.now())) send({ type: 'typing', room: room.name });
  });

  els.joinForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (joinRoom(els.joinInput.value)) {
      els.joinInput.value = '';
      els.input.focus();
    }
  });

  els.roomList.addEventListener('click', (ev) => {
    const button = ev.target instanceof Element ? ev.target.closest('button[data-action]') : null;
    if (!(button instanceof HTMLButtonElement) || button.dataset.room === undefined) return;
    if (button.dataset.action === 'switch') switchRoom(button.dataset.room);
    else if (button.dataset.action === 'leave') leaveRoom(button.dataset.room);
    els.input.focus();
  });

  els.messages.addEventListener('click', (ev) => {
    const button = ev.target instanceof Element ? ev.target.closest('button[data-action]') : null;
    if (!(button instanceof HTMLButtonElement) || button.dataset.id === undefined) return;
    if (button.dataset.action === 'retry') {
      state.outbox.retry(button.dataset.id);
      flushOutbox();
    } else if (button.dataset.action === 'discard') {
      state.outbox.discard(button.dataset.id);
    }
    persist();
    scheduleRender({ messages: true });
  });

  els.scroller.addEventListener(
    'scroll',
    () => {
      if (els.scroller.scrollTop < NEAR_TOP_PX) loadOlder();
    },
    { passive: true },
  );
  els.loadOlder.addEventListener('click', loadOlder);
  els.reconnectNow.addEventListener('click', reconnectNow);
  window.addEventListener('online', reconnectNow);
  // Back from sleep or a hidden tab: do not sit out the rest of a long backoff.
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') reconnectNow();
  });
}

// ---------------------------------------------------------------------------
// Start

initSession();
bindEvents();
renderAll();
connect();
