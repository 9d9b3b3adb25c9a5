'use strict';
// The Node.js floor: the least a legacy (nodejschat-protocol) server can do. A bare `ws`
// server: on connection (any path; ?session_key= is ignored, every key is accepted) it
// sends {"authenticated":true}; each inbound frame is parsed once, the outgoing
// {"time","user":"floor","message"} frame is built once and sent to every open client.
// No store, no checks, no history. Its throughput is the floor wschat should beat.
//
// Usage: node server.js [PORT]    (or PORT=… node server.js; default 56499)
//
// FLOOR_ROOMS=R (optional, for the rooms benchmarks): the client is in room (the last
// number in its session_key) % R, e.g. key k17 with R=1000 is in room 17, as the bench
// scripts' sessions k{i} are in room i % R; a frame goes only to its room's open clients.
// Without it (or R=0) everyone is in one room, as above.

const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || process.env.PORT || 56499);
const host = process.env.HOST || '127.0.0.1';
const AUTHENTICATED = '{"authenticated":true}';
const ROOMS = Number(process.env.FLOOR_ROOMS || 0);
const rooms = new Map(); // room -> Set of clients (FLOOR_ROOMS only)

function roomOf(req) {
  const key = new URL(req.url, 'http://x').searchParams.get('session_key') || '';
  const m = key.match(/(\d+)\D*$/);
  return m ? Number(m[1]) % ROOMS : 0;
}

const wss = new WebSocketServer({ host, port, perMessageDeflate: false, clientTracking: true });

wss.on('connection', (ws, req) => {
  let members = wss.clients;
  if (ROOMS > 0) {
    const room = roomOf(req);
    members = rooms.get(room);
    if (!members) rooms.set(room, (members = new Set()));
    members.add(ws);
    ws.on('close', () => members.delete(ws));
  }
  ws.send(AUTHENTICATED);
  ws.on('message', (data) => {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object' || msg.message === undefined) return;
    const text = typeof msg.message === 'string' ? msg.message : String(msg.message);
    const out = Buffer.from(
      JSON.stringify({ time: new Date().toISOString(), user: 'floor', message: text }),
    );
    for (const client of members) {
      if (client.readyState === WebSocket.OPEN) client.send(out, { binary: false });
    }
  });
  ws.on('error', () => {});
});

wss.on('listening', () => {
  process.stderr.write(`node-floor listening on ws://${host}:${port}/\n`);
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    for (const client of wss.clients) client.terminate();
    wss.close(() => process.exit(0));
  });
}
