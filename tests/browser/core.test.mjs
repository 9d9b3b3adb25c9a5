// Unit tests of web/chat-core.js (no browser, no server): node --test tests/browser/
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  ChatState,
  MAX_SEND_ATTEMPTS,
  Outbox,
  RoomState,
  TypingThrottle,
  backoffDelay,
  formatTime,
  newClientMsgId,
  roomNameProblem,
  trimRoomName,
  typingSentence,
  utf8Length,
} from '../../web/chat-core.js';

/** A message of room `room` with seq `seq`. */
function msg(seq, { room = 'general', user = 'bob', text = `m${seq}` } = {}) {
  return { room, seq, id: 1000 + seq, user, text, time: '2026-01-02T03:04:05.678Z' };
}

/** A ChatState in room "general", joined fresh, as user alice. */
function joinedState(lastSeq = 0) {
  let n = 0;
  const state = new ChatState({ outbox: new Outbox({ newId: () => `id-${++n}` }) });
  state.self = 'alice';
  state.switchTo('general');
  state.room('general').onJoined(lastSeq, undefined);
  return state;
}

describe('resume positions', () => {
  test('no position before any message: rejoin asks for the last messages', () => {
    const room = new RoomState('general');
    assert.equal(room.resumeSince, undefined);
  });

  test('an empty room resumes from 0', () => {
    const room = new RoomState('general');
    room.onJoined(0, undefined);
    assert.equal(room.resumeSince, 0);
    room.add(msg(1), 'live');
    assert.equal(room.resumeSince, 1);
  });

  test('the backfill sets the position at its first message and advances it', () => {
    const room = new RoomState('general');
    room.onJoined(150, undefined);
    for (let s = 101; s <= 150; s++) room.add(msg(s), 'live');
    assert.equal(room.resumeSince, 150);
    assert.equal(room.oldestSeq, 101);
    room.add(msg(151), 'live');
    assert.equal(room.resumeSince, 151);
  });

  test('a gap holds the position back until it is filled', () => {
    const room = new RoomState('general');
    room.onJoined(0, undefined);
    room.add(msg(1), 'live');
    room.add(msg(2), 'live');
    const { added, gap } = room.add(msg(5), 'live');
    assert.equal(added, true);
    assert.deepEqual(gap, { after: 2, before: 5 });
    assert.equal(room.resumeSince, 2, 'resume must re-ask for 3 and 4');
    room.addGapFill([msg(3), msg(4)]);
    assert.equal(room.resumeSince, 5);
    assert.deepEqual(room.seqs, [1, 2, 3, 4, 5]);
  });

  test('our own ack above a pending live message does not move the position or report a gap', () => {
    const state = joinedState(0);
    const room = state.room('general');
    state.onMessage(msg(1));
    const entry = state.outbox.add('general', 'mine', 0);
    state.outbox.takeDue(0);
    const { added } = state.onAck({ room: 'general', seq: 3, id: 9, client_msg_id: entry.clientMsgId, time: 't' });
    assert.equal(added, true);
    assert.equal(room.resumeSince, 1);
    const r = state.onMessage(msg(2));
    assert.equal(r.gap, null);
    assert.equal(room.resumeSince, 3, 'seq 2 closes the hole below the acked seq 3');
    const again = state.onMessage(msg(3, { user: 'alice', text: 'mine' }));
    assert.equal(again.added, false);
  });

  test('history pages of older messages never move the position', () => {
    const room = new RoomState('general');
    room.onJoined(60, undefined);
    for (let s = 51; s <= 60; s++) room.add(msg(s), 'live');
    room.addOlder([msg(41), msg(42), msg(50)], true);
    assert.equal(room.resumeSince, 60);
    assert.equal(room.oldestSeq, 41);
    assert.equal(room.hasMore, true);
  });
});

describe('dedup by room+seq', () => {
  test('a repeated seq is dropped', () => {
    const room = new RoomState('general');
    room.onJoined(0, undefined);
    assert.equal(room.add(msg(1), 'live').added, true);
    assert.equal(room.add(msg(1), 'live').added, false);
    assert.equal(room.add(msg(1), 'history').added, false);
    assert.equal(room.messages().length, 1);
  });

  test('out-of-order seqs are kept sorted, each once', () => {
    const room = new RoomState('general');
    for (const s of [5, 3, 9, 1, 3, 7, 5, 2, 9]) room.add(msg(s), 'history');
    assert.deepEqual(room.seqs, [1, 2, 3, 5, 7, 9]);
    assert.deepEqual(
      room.messages().map((m) => m.seq),
      [1, 2, 3, 5, 7, 9],
    );
  });

  test('a resume that replays what we have shows nothing twice', () => {
    const state = joinedState(0);
    for (let s = 1; s <= 5; s++) state.onMessage(msg(s));
    state.disconnected();
    const room = state.room('general');
    assert.equal(room.resumeSince, 5);
    room.onJoined(7, 3); // a server that resends a little too much
    const added = [3, 4, 5, 6, 7].map((s) => state.onMessage(msg(s)).added);
    assert.deepEqual(added, [false, false, false, true, true]);
    assert.deepEqual(room.seqs, [1, 2, 3, 4, 5, 6, 7]);
  });

  test('the same seq in two rooms is two messages', () => {
    const state = joinedState(0);
    state.ensureRoom('other').onJoined(0, undefined);
    assert.equal(state.onMessage(msg(1)).added, true);
    assert.equal(state.onMessage(msg(1, { room: 'other' })).added, true);
    assert.equal(state.onMessage(msg(1, { room: 'not-mine' })), null);
  });

  test('invalid seqs are ignored', () => {
    const room = new RoomState('general');
    assert.equal(room.add(msg(0), 'live').added, false);
    assert.equal(room.add(msg(-1), 'live').added, false);
    assert.equal(room.add({ ...msg(1), seq: 1.5 }, 'live').added, false);
    assert.equal(room.seqs.length, 0);
  });
});

describe('pending sends', () => {
  test('pending → acked: the entry leaves the outbox and becomes the message at its seq', () => {
    const state = joinedState(0);
    const entry = state.outbox.add('general', 'hello', 1);
    assert.equal(entry.state, 'queued');
    assert.deepEqual(state.outbox.visibleFor('general').map((e) => e.text), ['hello']);
    const sent = state.outbox.takeDue(2);
    assert.deepEqual(sent, [entry]);
    assert.equal(entry.state, 'sending');
    const { entry: acked, added } = state.onAck({
      room: 'general', seq: 1, id: 77, client_msg_id: entry.clientMsgId, time: '2026-01-02T03:04:05.678Z',
    });
    assert.equal(acked, entry);
    assert.equal(added, true);
    assert.equal(state.outbox.entries.length, 0);
    const shown = state.room('general').messages();
    assert.deepEqual(shown.map((m) => [m.seq, m.user, m.text]), [[1, 'alice', 'hello']]);
    // The echo of our own message arrives afterwards: not shown twice.
    assert.equal(state.onMessage(msg(1, { user: 'alice', text: 'hello' })).added, false);
    assert.equal(state.room('general').messages().length, 1);
  });

  test('an echo that comes before the ack hides the pending entry, so it shows once', () => {
    const state = joinedState(0);
    const entry = state.outbox.add('general', 'fast', 0);
    state.outbox.takeDue(0);
    state.onMessage(msg(1, { user: 'alice', text: 'fast' }));
    assert.equal(entry.echoSeq, 1);
    assert.equal(state.outbox.visibleFor('general').length, 0);
    assert.equal(state.room('general').messages().length, 1);
    state.onAck({ room: 'general', seq: 1, id: 1, client_msg_id: entry.clientMsgId, time: 't' });
    assert.equal(state.outbox.entries.length, 0);
    assert.equal(state.room('general').messages().length, 1);
  });

  test('a wrongly guessed echo is undone by the ack of the real owner', () => {
    const state = joinedState(0);
    const a = state.outbox.add('general', 'same', 0);
    state.outbox.takeDue(0);
    // Another tab of alice's posted "same" (seq 1); our own is seq 2.
    state.onMessage(msg(1, { user: 'alice', text: 'same' }));
    assert.equal(a.echoSeq, 1);
    state.onAck({ room: 'general', seq: 2, id: 2, client_msg_id: a.clientMsgId, time: 't' });
    assert.deepEqual(state.room('general').seqs, [1, 2]);
    assert.equal(state.outbox.entries.length, 0);
  });

  test('queued entries wait for a connection; in-flight ones go back to the queue on a drop', () => {
    const outbox = new Outbox({ newId: () => 'fixed' });
    const e = outbox.add('general', 'x', 0);
    assert.equal(outbox.nextRetryAt(), 0);
    outbox.takeDue(0);
    assert.deepEqual(outbox.takeDue(0), [], 'nothing is sent twice on one connection');
    outbox.connectionLost();
    assert.equal(e.state, 'queued');
    assert.deepEqual(outbox.takeDue(1), [e]);
    assert.equal(e.attempts, 2);
  });

  test('a retry keeps the client_msg_id', () => {
    let n = 0;
    const outbox = new Outbox({ newId: () => `cid-${++n}` });
    const e = outbox.add('general', 'x', 0);
    const id = e.clientMsgId;
    outbox.takeDue(0);
    const r = outbox.refuse(id, 'unavailable', 'store down', 1000, () => 0.5);
    assert.equal(r.retry, true);
    assert.ok(r.delayMs >= 500 && r.delayMs <= 1000, `delay ${r.delayMs}`);
    assert.equal(e.state, 'queued');
    assert.deepEqual(outbox.takeDue(1000), [], 'not before retryAt');
    const again = outbox.takeDue(1000 + r.delayMs);
    assert.equal(again.length, 1);
    assert.equal(again[0].clientMsgId, id);
    outbox.connectionLost();
    assert.equal(outbox.takeDue(1e9)[0].clientMsgId, id);
    outbox.refuse(id, 'message_too_large', 'too big', 0);
    assert.equal(e.state, 'failed');
    assert.equal(e.error, 'too big');
    assert.equal(outbox.retry(id), true);
    assert.equal(outbox.takeDue(0)[0].clientMsgId, id);
    assert.equal(n, 1, 'one id was ever made');
  });

  test('shutting_down and rate_limited are retried; a refusal for good is not', () => {
    const outbox = new Outbox();
    for (const code of ['shutting_down', 'rate_limited', 'unavailable']) {
      const e = outbox.add('r', code, 0);
      outbox.takeDue(0);
      assert.equal(outbox.refuse(e.clientMsgId, code, '', 0).retry, true, code);
    }
    for (const code of ['forbidden_room', 'empty_message', 'invalid_text']) {
      const e = outbox.add('r', code, 0);
      outbox.takeDue(0);
      assert.equal(outbox.refuse(e.clientMsgId, code, '', 0).retry, false, code);
      assert.equal(e.state, 'failed');
    }
    assert.equal(outbox.refuse('unknown', 'unavailable', '', 0), null);
  });

  test('automatic retries stop after MAX_SEND_ATTEMPTS', () => {
    const outbox = new Outbox();
    const e = outbox.add('r', 'x', 0);
    let now = 0;
    for (let i = 0; i < MAX_SEND_ATTEMPTS; i++) {
      now += 60000;
      assert.equal(outbox.takeDue(now).length, 1);
      outbox.refuse(e.clientMsgId, 'unavailable', 'down', now);
    }
    assert.equal(e.state, 'failed');
  });

  test('the outbox survives a reload with the same ids', () => {
    const outbox = new Outbox();
    const a = outbox.add('general', 'one', 5);
    const b = outbox.add('general', 'two', 6);
    outbox.takeDue(6);
    outbox.refuse(b.clientMsgId, 'forbidden_room', 'no', 6);
    const saved = JSON.parse(JSON.stringify(outbox));
    const restored = new Outbox();
    restored.restore(saved);
    restored.restore([{ junk: true }, null]);
    assert.deepEqual(
      restored.entries.map((e) => [e.clientMsgId, e.text, e.state]),
      [
        [a.clientMsgId, 'one', 'queued'],
        [b.clientMsgId, 'two', 'failed'],
      ],
    );
  });

  test('client_msg_ids are unique and short enough for the server (<= 128 bytes)', () => {
    const ids = new Set(Array.from({ length: 1000 }, () => newClientMsgId()));
    assert.equal(ids.size, 1000);
    for (const id of ids) assert.ok(id.length > 16 && id.length <= 128);
  });
});

describe('reset', () => {
  test('a reset clears the room and the next live message sets the position again', () => {
    const state = joinedState(0);
    for (let s = 1; s <= 3; s++) state.onMessage(msg(s));
    const room = state.room('general');
    room.hasMore = false;
    state.onReset('general');
    assert.deepEqual(room.seqs, []);
    assert.equal(room.resumeSince, undefined);
    assert.equal(room.hasMore, null);
    state.onMessage(msg(900));
    state.onMessage(msg(901));
    assert.deepEqual(room.seqs, [900, 901]);
    assert.equal(room.resumeSince, 901);
    assert.equal(room.canLoadOlder(), true);
    assert.equal(room.olderBeforeSeq(), 900);
  });

  test('a reset un-hides pending entries that guessed an echo', () => {
    const state = joinedState(0);
    const e = state.outbox.add('general', 'x', 0);
    state.outbox.takeDue(0);
    state.onMessage(msg(1, { user: 'alice', text: 'x' }));
    assert.equal(state.outbox.visibleFor('general').length, 0);
    state.onReset('general');
    assert.deepEqual(state.outbox.visibleFor('general'), [e]);
  });

  test('reset of a room we do not have is ignored', () => {
    assert.equal(joinedState().onReset('nope'), null);
  });
});

describe('scroll-back', () => {
  test('older pages until seq 1, then no more', () => {
    const room = new RoomState('general');
    room.onJoined(150, undefined);
    for (let s = 101; s <= 150; s++) room.add(msg(s), 'live');
    assert.equal(room.canLoadOlder(), true);
    assert.equal(room.olderBeforeSeq(), 101);
    room.loadingOlder = true;
    assert.equal(room.canLoadOlder(), false, 'one request at a time');
    room.addOlder(Array.from({ length: 50 }, (_, i) => msg(51 + i)), true);
    assert.equal(room.olderBeforeSeq(), 51);
    room.addOlder(Array.from({ length: 50 }, (_, i) => msg(1 + i)), false);
    assert.equal(room.oldestSeq, 1);
    assert.equal(room.hasMore, false);
    assert.equal(room.canLoadOlder(), false);
    assert.equal(room.seqs.length, 150);
  });

  test('a seq held below a hole (a late ack) does not make paging skip the hole', () => {
    const state = joinedState(600);
    const room = state.room('general');
    const entry = state.outbox.add('general', 'sent before a reload', 0);
    state.outbox.takeDue(0);
    for (let s = 501; s <= 600; s++) state.onMessage(msg(s));
    state.onAck({ room: 'general', seq: 10, id: 10, client_msg_id: entry.clientMsgId, time: 't' });
    assert.equal(room.oldestSeq, 10);
    assert.equal(room.olderBeforeSeq(), 501);
    assert.equal(room.canLoadOlder(), true);
    room.addOlder(Array.from({ length: 100 }, (_, i) => msg(401 + i)), true);
    assert.equal(room.olderBeforeSeq(), 401);
    assert.equal(room.hasMore, true);
  });

  test('not before the room is joined; an empty joined room has nothing older', () => {
    const room = new RoomState('general');
    assert.equal(room.canLoadOlder(), false);
    room.onJoined(0, undefined);
    assert.equal(room.canLoadOlder(), false);
    const other = new RoomState('other');
    other.onJoined(10, undefined); // history_limit 0: nothing came with the join
    assert.equal(other.canLoadOlder(), true);
    assert.equal(other.olderBeforeSeq(), undefined);
  });
});

describe('rooms, unread, presence, typing', () => {
  test('unread counts messages in rooms not in view, not the join backfill, not our own', () => {
    const state = joinedState(0);
    const other = state.ensureRoom('other');
    other.onJoined(3, undefined);
    for (let s = 1; s <= 3; s++) state.onMessage(msg(s, { room: 'other' }));
    assert.equal(other.unread, 0, 'backfill of a fresh join is not unread');
    state.onMessage(msg(4, { room: 'other' }));
    state.onMessage(msg(5, { room: 'other', user: 'alice' }));
    state.onMessage(msg(4, { room: 'other' }));
    state.onMessage(msg(1));
    assert.equal(other.unread, 1);
    assert.equal(state.room('general').unread, 0, 'the room in view has no unread');
    assert.equal(state.totalUnread(), 1);
    // After a reconnect, the backfill after `since` is new to us.
    state.disconnected();
    other.onJoined(7, 5);
    state.onMessage(msg(6, { room: 'other' }));
    state.onMessage(msg(7, { room: 'other' }));
    assert.equal(other.unread, 3);
    state.switchTo('other');
    assert.equal(other.unread, 0);
  });

  test('leaving the room in view moves to a neighbour', () => {
    const state = joinedState();
    state.ensureRoom('a');
    state.ensureRoom('b');
    state.switchTo('a');
    state.removeRoom('a');
    assert.equal(state.current, 'b');
    state.removeRoom('general');
    assert.equal(state.current, 'b');
    state.removeRoom('b');
    assert.equal(state.current, null);
    assert.equal(state.rooms.size, 0);
  });

  test('presence and presence_diff', () => {
    const room = new RoomState('r');
    room.setPresence(['alice', 'bob']);
    room.applyPresenceDiff(['carol'], ['bob']);
    assert.deepEqual([...room.presence].sort(), ['alice', 'carol']);
    room.disconnected();
    assert.equal(room.presence.size, 0);
  });

  test('typing notices expire after 5 s and end with a message', () => {
    const state = joinedState(0);
    const room = state.room('general');
    room.noteTyping('bob', 1000);
    room.noteTyping('carol', 3000);
    assert.deepEqual(room.typingUsers(1000), ['bob', 'carol']);
    assert.deepEqual(room.typingUsers(6500), ['carol']);
    state.onMessage(msg(1, { user: 'carol' }));
    assert.deepEqual(room.typingUsers(6500), []);
    assert.equal(typingSentence([]), '');
    assert.equal(typingSentence(['bob']), 'bob is typing…');
    assert.equal(typingSentence(['bob', 'carol']), 'bob and carol are typing…');
    assert.equal(typingSentence(['a', 'b', 'c']), 'Several people are typing…');
  });

  test('typing notices go out at most every 3 s per room', () => {
    const t = new TypingThrottle();
    assert.equal(t.shouldSend('r', 0), true);
    assert.equal(t.shouldSend('r', 2999), false);
    assert.equal(t.shouldSend('other', 100), true);
    assert.equal(t.shouldSend('r', 3000), true);
    t.reset('r');
    assert.equal(t.shouldSend('r', 3001), true);
  });
});

describe('backoff', () => {
  test('stays within [cap/2, cap] and grows to the maximum', () => {
    for (let attempt = 0; attempt < 40; attempt++) {
      const cap = Math.min(30000, 500 * 2 ** Math.min(attempt, 30));
      const lo = backoffDelay(attempt, { random: () => 0 });
      const hi = backoffDelay(attempt, { random: () => 0.999999 });
      assert.equal(lo, Math.round(cap / 2), `attempt ${attempt}`);
      assert.ok(hi <= cap && hi >= cap - 1, `attempt ${attempt}: ${hi} vs ${cap}`);
    }
    assert.equal(backoffDelay(100, { random: () => 1 }), 30000);
    assert.ok(backoffDelay(0) >= 250 && backoffDelay(0) <= 500);
  });

  test('jitter spreads clients apart', () => {
    const delays = new Set(Array.from({ length: 50 }, () => backoffDelay(5)));
    assert.ok(delays.size > 10);
    for (const d of delays) assert.ok(d >= 8000 && d <= 16000, String(d));
  });

  test('nonsense attempts are treated as the first', () => {
    assert.equal(backoffDelay(-3, { random: () => 0 }), 250);
    assert.equal(backoffDelay(Number.NaN, { random: () => 0 }), 250);
    assert.equal(backoffDelay(2, { baseMs: 100, maxMs: 300, random: () => 1 }), 300);
  });
});

describe('helpers', () => {
  test('room names follow the server rules', () => {
    assert.equal(roomNameProblem('general'), null);
    assert.equal(roomNameProblem('3'), null);
    assert.equal(roomNameProblem('Ünïcødé room 🎉'), null);
    assert.match(roomNameProblem(''), /empty/);
    assert.match(roomNameProblem('a'.repeat(65)), /64/);
    assert.equal(roomNameProblem('é'.repeat(32)), null);
    assert.match(roomNameProblem('é'.repeat(33)), /64/);
    assert.match(roomNameProblem('a\nb'), /control/);
    assert.match(roomNameProblem(' a'), /space/);
    assert.match(roomNameProblem('a\u3000'), /space/);
    // The server's whitespace is Unicode's White_Space, which U+FEFF is not: a room of
    // its own there, so not trimmed here.
    assert.equal(roomNameProblem('\uFEFFx'), null);
    assert.equal(trimRoomName('\uFEFFx\u00A0 '), '\uFEFFx');
  });

  test('utf8Length counts bytes', () => {
    assert.equal(utf8Length('abc'), 3);
    assert.equal(utf8Length('é'), 2);
    assert.equal(utf8Length('🎉'), 4);
  });

  test('formatTime shows local time, with the date when not today', () => {
    const iso = '2026-01-02T03:04:05.678Z';
    const d = new Date(iso);
    const sameDay = formatTime(iso, d, 'en-GB');
    assert.equal(sameDay, d.toLocaleTimeString('en-GB', { hour: '2-digit', minute: '2-digit' }));
    const later = formatTime(iso, new Date(d.getTime() + 3 * 86400000), 'en-GB');
    assert.ok(later.endsWith(sameDay) && later.length > sameDay.length, later);
    assert.equal(formatTime('not a time'), '');
  });
});
