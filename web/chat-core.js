// chat-core.js: the chat client's pure logic, with no DOM and no WebSocket.
//
// It owns: per-room state (messages deduplicated by seq, resume position, unread
// count, presence, typing), the outbox of sends keyed by client_msg_id, reconnect
// backoff, and small helpers (room-name rules, UTF-8 length, time formatting).
// app.js feeds it server frames and renders what it holds.

/**
 * A stored message as the server sends it (`message` frames, `history` pages).
 * @typedef {object} Message
 * @property {string} room
 * @property {number} seq   gap-free per room, starting at 1
 * @property {number} id
 * @property {string} user
 * @property {string} text
 * @property {string} time  RFC 3339 UTC
 */

/**
 * How a message reached the client.
 * - `live`: a `message` frame (backfill after `joined`, or live). These arrive in seq
 *   order per room, so they set and advance the resume position and reveal gaps.
 * - `history`: part of a `history` page (older messages, or a gap being filled).
 * - `ack`: built from the `ack` of our own send.
 * @typedef {'live' | 'history' | 'ack'} Source
 */

/** Longest room name, in UTF-8 bytes (crates/protocol/src/room.rs). */
export const MAX_ROOM_NAME_BYTES = 64;

/** Typing notices are shown this long after the last one from a user. */
export const TYPING_SHOW_MS = 5000;

/** We tell the server we are typing at most this often per room. */
export const TYPING_SEND_EVERY_MS = 3000;

/** Error codes after which a send is retried, later, with the same client_msg_id. */
export const RETRYABLE_SEND_CODES = new Set([
  'unavailable',
  'shutting_down',
  'rate_limited',
  'internal',
  'not_authenticated',
]);

/** Automatic retries of one send before it is shown as failed (the user can retry). */
export const MAX_SEND_ATTEMPTS = 10;

const textEncoder = new TextEncoder();

/**
 * Length of a string in UTF-8 bytes (the unit of `limits.max_message_bytes`).
 * @param {string} text
 * @returns {number}
 */
export function utf8Length(text) {
  return textEncoder.encode(text).length;
}

/**
 * Why a room name is not acceptable, or null when it is. Mirrors the server's rule:
 * 1 to 64 bytes, no control characters, no leading or trailing whitespace.
 * @param {string} name
 * @returns {string | null}
 */
export function roomNameProblem(name) {
  if (name.length === 0) return 'Room name is empty.';
  if (utf8Length(name) > MAX_ROOM_NAME_BYTES) return 'Room name is longer than 64 bytes.';
  // \p{Cc}: the same set as Rust's char::is_control.
  if (/\p{Cc}/u.test(name)) return 'Room name contains a control character.';
  if (trimRoomName(name) !== name) return 'Room name starts or ends with a space.';
  return null;
}

/**
 * `name` without leading and trailing whitespace as the server counts it (Rust's
 * `char::is_whitespace`, Unicode's White_Space). JavaScript's `trim()` also strips U+FEFF,
 * which the server keeps: "\uFEFFx" is a room of its own there.
 * @param {string} name
 */
export function trimRoomName(name) {
  return name.replace(/^\p{White_Space}+|\p{White_Space}+$/gu, '');
}

/**
 * Delay before reconnect attempt number `attempt` (0-based): exponential growth with
 * "equal jitter", so the delay lies in [cap/2, cap] where cap = min(maxMs, baseMs·2^attempt).
 * Never zero (no reconnect storm), never above maxMs.
 * @param {number} attempt
 * @param {{baseMs?: number, maxMs?: number, random?: () => number}} [options]
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, { baseMs = 500, maxMs = 30000, random = Math.random } = {}) {
  const n = Math.max(0, Math.min(Math.floor(attempt) || 0, 30));
  const cap = Math.min(maxMs, baseMs * 2 ** n);
  return Math.round(cap / 2 + random() * (cap / 2));
}

/**
 * A fresh client_msg_id: 128 random bits as hex. Works outside secure contexts too,
 * where crypto.randomUUID is missing.
 * @param {(bytes: Uint8Array) => Uint8Array} [fill]
 * @returns {string}
 */
export function newClientMsgId(fill = (b) => globalThis.crypto.getRandomValues(b)) {
  const bytes = fill(new Uint8Array(16));
  return 'c-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Local time of an RFC 3339 timestamp, short: the time alone when it is today,
 * date and time otherwise.
 * @param {string} iso
 * @param {Date} [now]
 * @param {string | string[]} [locale]
 * @returns {string}
 */
export function formatTime(iso, now = new Date(), locale = undefined) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  const time = d.toLocaleTimeString(locale, { hour: '2-digit', minute: '2-digit' });
  if (d.toDateString() === now.toDateString()) return time;
  const date = d.toLocaleDateString(locale, { month: 'short', day: 'numeric' });
  return `${date} ${time}`;
}

/**
 * The people typing, as one short sentence ("" when nobody is).
 * @param {string[]} users
 * @returns {string}
 */
export function typingSentence(users) {
  if (users.length === 0) return '';
  if (users.length === 1) return `${users[0]} is typing…`;
  if (users.length === 2) return `${users[0]} and ${users[1]} are typing…`;
  return 'Several people are typing…';
}

/** One room as this client knows it. */
export class RoomState {
  /** @param {string} name */
  constructor(name) {
    this.name = name;
    /** @type {Map<number, Message>} */
    this.bySeq = new Map();
    /** Seqs held, ascending. @type {number[]} */
    this.seqs = [];
    /**
     * Resume position: every seq from the first live message up to this one is held.
     * null until the first live message (or an empty room) after a join or reset.
     * @type {number | null}
     */
    this.lastContiguous = null;
    /** Whether older messages exist on the server; null = unknown. @type {boolean | null} */
    this.hasMore = null;
    /** A `history` request for older messages is in flight. */
    this.loadingOlder = false;
    /** A `history` request filling a gap is in flight. */
    this.fillingGap = false;
    /** The server confirmed the join on the current connection. */
    this.joined = false;
    /** A `join` is in flight. */
    this.joining = false;
    /** The room's newest seq when it was joined (from `joined.last_seq`). */
    this.lastSeqAtJoin = 0;
    /** Messages above this seq count as unread when the room is not in view. */
    this.unreadAfter = Infinity;
    /** Messages that arrived while the room was not in view. */
    this.unread = 0;
    /** @type {Set<string>} */
    this.presence = new Set();
    /** user → time (ms) the typing notice expires. @type {Map<string, number>} */
    this.typing = new Map();
  }

  /** @returns {number | null} */
  get oldestSeq() {
    return this.seqs.length ? this.seqs[0] : null;
  }

  /** @returns {number | null} */
  get newestSeq() {
    return this.seqs.length ? this.seqs[this.seqs.length - 1] : null;
  }

  /**
   * The `since` to send when (re)joining: the last seq shown without a gap before it,
   * or undefined to ask for the room's last messages.
   * @returns {number | undefined}
   */
  get resumeSince() {
    return this.lastContiguous === null ? undefined : this.lastContiguous;
  }

  /** @returns {Message[]} messages in seq order */
  messages() {
    return this.seqs.map((s) => /** @type {Message} */ (this.bySeq.get(s)));
  }

  /** @param {number} seq */
  has(seq) {
    return this.bySeq.has(seq);
  }

  /**
   * Add a message unless its seq is already held.
   * @param {Message} msg
   * @param {Source} source
   * @returns {{added: boolean, gap: {after: number, before: number} | null}}
   *   `gap`: live messages between `after` and `before` (exclusive) are missing.
   */
  add(msg, source) {
    const seq = msg.seq;
    if (!Number.isSafeInteger(seq) || seq < 1) return { added: false, gap: null };
    let gap = null;
    const added = !this.bySeq.has(seq);
    if (added) {
      this.bySeq.set(seq, msg);
      insertSorted(this.seqs, seq);
    }
    if (source === 'live') {
      if (this.lastContiguous === null) {
        // First live message after a join without `since` (or a reset): the backfill
        // starts here; anything older is reachable by `history`.
        this.lastContiguous = seq;
      } else if (seq > this.lastContiguous + 1 && this.firstMissingAfter(this.lastContiguous) < seq) {
        gap = { after: this.lastContiguous, before: seq };
      }
    }
    this.advance();
    return { added, gap };
  }

  /**
   * The smallest seq above `after` that is not held.
   * @param {number} after
   */
  firstMissingAfter(after) {
    let s = after + 1;
    while (this.bySeq.has(s)) s += 1;
    return s;
  }

  /** Move the resume position over every seq now held right after it. */
  advance() {
    if (this.lastContiguous === null) return;
    this.lastContiguous = this.firstMissingAfter(this.lastContiguous) - 1;
  }

  /**
   * The server answered a join: remember where the room stood.
   * @param {number} lastSeq `joined.last_seq`
   * @param {number | undefined} since the `since` this join carried
   */
  onJoined(lastSeq, since) {
    this.joined = true;
    this.joining = false;
    this.lastSeqAtJoin = lastSeq;
    // On a fresh join the backfill is old news; on a resume it is new.
    this.unreadAfter = since === undefined ? lastSeq : since;
    if (since === undefined && lastSeq === 0) {
      this.lastContiguous = 0;
      this.hasMore = false;
    }
  }

  /**
   * Forget every message (a `reset`, or a `since` the server refused): the room's last
   * messages follow, older ones are there by `history`.
   */
  clear() {
    this.bySeq.clear();
    this.seqs = [];
    this.lastContiguous = null;
    this.hasMore = null;
    this.loadingOlder = false;
    this.fillingGap = false;
  }

  /**
   * Whether it makes sense to ask for older messages now.
   * @returns {boolean}
   */
  canLoadOlder() {
    if (!this.joined || this.loadingOlder || this.hasMore === false) return false;
    const before = this.olderBeforeSeq();
    if (before === undefined) return this.lastSeqAtJoin > 0;
    return before > 1;
  }

  /**
   * The `before_seq` of the next older page (undefined: the newest page).
   * @returns {number | undefined}
   */
  olderBeforeSeq() {
    const oldest = this.oldestSeq;
    if (oldest === null) return undefined;
    // The bottom of the block the person reads down from: a seq held below a hole in it
    // (a retried send's ack, for one) must not make paging skip the hole.
    const top = this.lastContiguous;
    if (top === null || !this.bySeq.has(top)) return oldest;
    let bottom = top;
    while (this.bySeq.has(bottom - 1)) bottom -= 1;
    return bottom;
  }

  /**
   * A page of older messages arrived.
   * @param {Message[]} messages
   * @param {boolean} hasMore
   * @returns {number} how many were new
   */
  addOlder(messages, hasMore) {
    this.loadingOlder = false;
    let n = 0;
    for (const m of messages) if (this.add(m, 'history').added) n += 1;
    const before = this.olderBeforeSeq();
    this.hasMore = hasMore && !(before !== undefined && before <= 1);
    return n;
  }

  /**
   * Messages that fill a gap arrived.
   * @param {Message[]} messages
   * @returns {number} how many were new
   */
  addGapFill(messages) {
    this.fillingGap = false;
    let n = 0;
    for (const m of messages) if (this.add(m, 'history').added) n += 1;
    return n;
  }

  /** The connection dropped: nothing is joined or in flight any more. */
  disconnected() {
    this.joined = false;
    this.joining = false;
    this.loadingOlder = false;
    this.fillingGap = false;
    this.presence.clear();
    this.typing.clear();
  }

  /** @param {string[]} users */
  setPresence(users) {
    this.presence = new Set(users);
  }

  /**
   * @param {string[]} joined
   * @param {string[]} left
   */
  applyPresenceDiff(joined, left) {
    for (const u of left) this.presence.delete(u);
    for (const u of joined) this.presence.add(u);
  }

  /**
   * @param {string} user
   * @param {number} now ms
   */
  noteTyping(user, now) {
    this.typing.set(user, now + TYPING_SHOW_MS);
  }

  /**
   * Users whose typing notice has not expired, oldest notice first.
   * @param {number} now ms
   * @returns {string[]}
   */
  typingUsers(now) {
    const out = [];
    for (const [user, until] of this.typing) {
      if (until > now) out.push(user);
      else this.typing.delete(user);
    }
    return out;
  }
}

/**
 * @param {number[]} arr ascending
 * @param {number} value not in arr
 */
function insertSorted(arr, value) {
  if (arr.length === 0 || arr[arr.length - 1] < value) {
    arr.push(value);
    return;
  }
  let lo = 0;
  let hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (arr[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  arr.splice(lo, 0, value);
}

/**
 * One message the user wrote that the server has not acknowledged yet.
 * @typedef {object} OutboxEntry
 * @property {string} clientMsgId  stays the same across every retry
 * @property {string} room
 * @property {string} text
 * @property {number} createdAt    ms
 * @property {'queued' | 'sending' | 'failed'} state
 *   queued: waits for a connection (or for retryAt); sending: on the wire, no answer yet;
 *   failed: the server refused it for good, or too many retries; the user decides.
 * @property {number} attempts     sends so far
 * @property {number} retryAt      ms; queued entries go out once now >= retryAt
 * @property {string | null} error the last refusal, for the user
 * @property {number | null} echoSeq seq of a `message` frame that is probably this one
 *   (arrived before the ack); the entry is hidden meanwhile so it never shows twice.
 */

/**
 * The messages the user wrote that are not acknowledged yet, in the order written.
 * Each keeps its client_msg_id for life, so a retry never stores a second row.
 */
export class Outbox {
  /** @param {{newId?: () => string}} [options] */
  constructor({ newId = () => newClientMsgId() } = {}) {
    /** @type {OutboxEntry[]} */
    this.entries = [];
    this.newId = newId;
  }

  /**
   * @param {string} room
   * @param {string} text
   * @param {number} now ms
   * @returns {OutboxEntry}
   */
  add(room, text, now) {
    /** @type {OutboxEntry} */
    const entry = {
      clientMsgId: this.newId(),
      room,
      text,
      createdAt: now,
      state: 'queued',
      attempts: 0,
      retryAt: 0,
      error: null,
      echoSeq: null,
    };
    this.entries.push(entry);
    return entry;
  }

  /** @param {string} clientMsgId */
  get(clientMsgId) {
    return this.entries.find((e) => e.clientMsgId === clientMsgId) ?? null;
  }

  /**
   * Entries to put on the wire now; they become `sending`.
   * @param {number} now ms
   * @returns {OutboxEntry[]}
   */
  takeDue(now) {
    const due = this.entries.filter((e) => e.state === 'queued' && e.retryAt <= now);
    for (const e of due) {
      e.state = 'sending';
      e.attempts += 1;
    }
    return due;
  }

  /**
   * When the next queued entry becomes due (ms), or null if none waits.
   * @returns {number | null}
   */
  nextRetryAt() {
    let next = null;
    for (const e of this.entries) {
      if (e.state === 'queued' && (next === null || e.retryAt < next)) next = e.retryAt;
    }
    return next;
  }

  /**
   * The server acknowledged a send: the entry leaves the outbox.
   * @param {string | undefined} clientMsgId from the ack
   * @param {number} seq from the ack
   * @returns {OutboxEntry | null} the entry acknowledged, if it was ours
   */
  ack(clientMsgId, seq) {
    const i = this.entries.findIndex((e) => e.clientMsgId === clientMsgId);
    if (i < 0) return null;
    const [entry] = this.entries.splice(i, 1);
    // Another entry guessed this seq was its echo: it was not, show it again.
    for (const e of this.entries) {
      if (e.echoSeq === seq && e.room === entry.room) e.echoSeq = null;
    }
    return entry;
  }

  /**
   * The server refused a send.
   * @param {string} clientMsgId
   * @param {string} code error code
   * @param {string} message error text
   * @param {number} now ms
   * @param {() => number} [random]
   * @returns {{retry: boolean, delayMs: number} | null} null if not ours
   */
  refuse(clientMsgId, code, message, now, random = Math.random) {
    const entry = this.get(clientMsgId);
    if (!entry) return null;
    entry.echoSeq = null;
    if (RETRYABLE_SEND_CODES.has(code) && entry.attempts < MAX_SEND_ATTEMPTS) {
      const delayMs = backoffDelay(entry.attempts - 1, { baseMs: 1000, maxMs: 30000, random });
      entry.state = 'queued';
      entry.retryAt = now + delayMs;
      entry.error = null;
      return { retry: true, delayMs };
    }
    entry.state = 'failed';
    entry.error = message || code;
    return { retry: false, delayMs: 0 };
  }

  /**
   * The user asked to try a failed entry again (same client_msg_id).
   * @param {string} clientMsgId
   * @returns {boolean}
   */
  retry(clientMsgId) {
    const entry = this.get(clientMsgId);
    if (!entry || entry.state !== 'failed') return false;
    entry.state = 'queued';
    entry.retryAt = 0;
    entry.attempts = 0;
    entry.error = null;
    return true;
  }

  /**
   * The user gave up on an entry.
   * @param {string} clientMsgId
   * @returns {boolean}
   */
  discard(clientMsgId) {
    const before = this.entries.length;
    this.entries = this.entries.filter((e) => e.clientMsgId !== clientMsgId);
    return this.entries.length !== before;
  }

  /**
   * The connection dropped: whatever was on the wire goes again on the next one,
   * with the same client_msg_id (the server answers a repeat with the first ack).
   */
  connectionLost() {
    for (const e of this.entries) {
      if (e.state === 'sending') {
        e.state = 'queued';
        e.retryAt = 0;
      }
    }
  }

  /**
   * A `message` frame from our own user arrived before the ack: if an unacknowledged
   * entry has the same room and text, take it as that entry's echo and hide the entry.
   * @param {Message} msg
   * @param {string | null} self our user name
   * @returns {OutboxEntry | null}
   */
  matchEcho(msg, self) {
    if (self === null || msg.user !== self) return null;
    if (this.entries.some((e) => e.echoSeq === msg.seq && e.room === msg.room)) return null;
    const entry = this.entries.find(
      (e) => e.state === 'sending' && e.echoSeq === null && e.room === msg.room && e.text === msg.text,
    );
    if (!entry) return null;
    entry.echoSeq = msg.seq;
    return entry;
  }

  /**
   * Entries of a room to show below the stored messages.
   * @param {string} room
   * @returns {OutboxEntry[]}
   */
  visibleFor(room) {
    return this.entries.filter((e) => e.room === room && e.echoSeq === null);
  }

  /** @returns {object[]} what to keep across a reload */
  toJSON() {
    return this.entries.map((e) => ({
      clientMsgId: e.clientMsgId,
      room: e.room,
      text: e.text,
      createdAt: e.createdAt,
      failed: e.state === 'failed' ? e.error : null,
    }));
  }

  /**
   * Restore what toJSON kept. Unknown shapes are skipped.
   * @param {unknown} saved
   */
  restore(saved) {
    if (!Array.isArray(saved)) return;
    for (const s of saved) {
      if (!s || typeof s.clientMsgId !== 'string' || typeof s.room !== 'string' || typeof s.text !== 'string') {
        continue;
      }
      if (this.get(s.clientMsgId)) continue;
      this.entries.push({
        clientMsgId: s.clientMsgId,
        room: s.room,
        text: s.text,
        createdAt: typeof s.createdAt === 'number' ? s.createdAt : 0,
        state: typeof s.failed === 'string' ? 'failed' : 'queued',
        attempts: 0,
        retryAt: 0,
        error: typeof s.failed === 'string' ? s.failed : null,
        echoSeq: null,
      });
    }
  }
}

/** Sends at most one typing notice per room every TYPING_SEND_EVERY_MS. */
export class TypingThrottle {
  constructor(everyMs = TYPING_SEND_EVERY_MS) {
    this.everyMs = everyMs;
    /** @type {Map<string, number>} */
    this.lastSent = new Map();
  }

  /**
   * @param {string} room
   * @param {number} now ms
   * @returns {boolean} whether to send a typing notice now
   */
  shouldSend(room, now) {
    const last = this.lastSent.get(room);
    if (last !== undefined && now - last < this.everyMs) return false;
    this.lastSent.set(room, now);
    return true;
  }

  /** Forget a room (we sent a message: the next keystroke may notify again). */
  reset(room) {
    this.lastSent.delete(room);
  }
}

/**
 * Everything the page shows apart from the connection: rooms, the room in view,
 * our user, the outbox. Server frames go in through the `on…` methods.
 */
export class ChatState {
  /** @param {{outbox?: Outbox}} [options] */
  constructor({ outbox = new Outbox() } = {}) {
    /** @type {Map<string, RoomState>} in the order joined */
    this.rooms = new Map();
    /** @type {string | null} */
    this.current = null;
    /** Our user name, from `hello`. @type {string | null} */
    this.self = null;
    this.outbox = outbox;
  }

  /**
   * The room called `name`, created if new.
   * @param {string} name
   * @returns {RoomState}
   */
  ensureRoom(name) {
    let room = this.rooms.get(name);
    if (!room) {
      room = new RoomState(name);
      this.rooms.set(name, room);
    }
    return room;
  }

  /** @param {string} name */
  room(name) {
    return this.rooms.get(name) ?? null;
  }

  /**
   * Put a room in view; its unread count goes to zero.
   * @param {string} name
   */
  switchTo(name) {
    const room = this.ensureRoom(name);
    this.current = name;
    room.unread = 0;
  }

  /**
   * Forget a room; the room in view moves to a neighbour.
   * @param {string} name
   */
  removeRoom(name) {
    const names = [...this.rooms.keys()];
    const i = names.indexOf(name);
    if (i < 0) return;
    this.rooms.delete(name);
    if (this.current === name) {
      const rest = names.filter((n) => n !== name);
      this.current = rest.length ? rest[Math.min(i, rest.length - 1)] : null;
      if (this.current !== null) this.switchTo(this.current);
    }
  }

  /** @returns {number} unread messages over all rooms */
  totalUnread() {
    let n = 0;
    for (const r of this.rooms.values()) n += r.unread;
    return n;
  }

  /**
   * A `message` frame.
   * @param {Message} msg
   * @returns {{room: RoomState, added: boolean, gap: {after: number, before: number} | null} | null}
   *   null if the room is not one of ours
   */
  onMessage(msg) {
    const room = this.rooms.get(msg.room);
    if (!room) return null;
    this.outbox.matchEcho(msg, this.self);
    const { added, gap } = room.add(msg, 'live');
    room.typing.delete(msg.user);
    if (added && msg.room !== this.current && msg.user !== this.self && msg.seq > room.unreadAfter) {
      room.unread += 1;
    }
    return { room, added, gap };
  }

  /**
   * An `ack` of one of our sends.
   * @param {{room: string, seq: number, id: number, client_msg_id?: string, time: string}} ack
   * @returns {{entry: OutboxEntry | null, added: boolean}}
   */
  onAck(ack) {
    const entry = this.outbox.ack(ack.client_msg_id, ack.seq);
    const room = this.rooms.get(ack.room);
    let added = false;
    if (entry && room) {
      added = room.add(
        { room: ack.room, seq: ack.seq, id: ack.id, user: this.self ?? '', text: entry.text, time: ack.time },
        'ack',
      ).added;
    }
    return { entry, added };
  }

  /**
   * A `reset`: drop what we show of the room; its last messages follow.
   * @param {string} name
   * @returns {RoomState | null}
   */
  onReset(name) {
    const room = this.rooms.get(name);
    if (!room) return null;
    room.clear();
    for (const e of this.outbox.entries) if (e.room === name) e.echoSeq = null;
    return room;
  }

  /** The connection dropped. */
  disconnected() {
    for (const r of this.rooms.values()) r.disconnected();
    this.outbox.connectionLost();
  }
}
