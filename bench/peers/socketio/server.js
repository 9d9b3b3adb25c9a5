'use strict';
// The Socket.IO peer: the node-floor's chat room, written the way a Socket.IO 4 app
// would write it. On connection (namespace "/", WebSocket transport; ?session_key= is
// not checked, every key is accepted) the socket joins its room; each "message" event
// whose payload is {"message": TEXT} is answered with one broadcast of the event
// "message" {"time","user":"socketio","message"} to the room (Socket.IO encodes a
// broadcast once and writes it to every member). No store, no checks, no history, no
// connection state recovery.
//
// Usage: node server.js [PORT]    (or PORT=… node server.js; default 56498)
//
// FLOOR_ROOMS=R (optional, as node-floor): the client is in room (the last number in its
// session_key) % R; without it (or R=0) everyone is in one room.
//
// REDIS_URL=redis://127.0.0.1:6379 (optional, for bench/multinode.sh): several of these
// processes form one cluster through Socket.IO's Redis adapter (@socket.io/redis-adapter,
// pub/sub on the channel prefix REDIS_KEY, default "socket.io"): a broadcast reaches the
// room's members on every node.
//
// The wire, as `wschat load --protocol socketio` speaks it (Engine.IO 4 over a
// WebSocket at /socket.io/?EIO=4&transport=websocket): the server opens with `0{…}`,
// the client connects to "/" with `40`, the server answers `40{"sid":…}`; events are
// `42["message",{…}]` both ways; the server pings with `2`, the client answers `3`.

const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.argv[2] || process.env.PORT || 56498);
const host = process.env.HOST || '127.0.0.1';
const ROOMS = Number(process.env.FLOOR_ROOMS || 0);

function roomOf(key) {
  const m = String(key || '').match(/(\d+)\D*$/);
  return ROOMS > 0 && m ? `r${Number(m[1]) % ROOMS}` : 'all';
}

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
  httpCompression: false,
});

io.on('connection', (socket) => {
  const room = roomOf(socket.handshake.query.session_key);
  socket.join(room);
  socket.on('message', (msg) => {
    if (msg === null || typeof msg !== 'object' || msg.message === undefined) return;
    const text = typeof msg.message === 'string' ? msg.message : String(msg.message);
    io.to(room).emit('message', { time: new Date().toISOString(), user: 'socketio', message: text });
  });
});

async function clusterAdapter() {
  if (!process.env.REDIS_URL) return;
  const { createClient } = require('redis');
  const { createAdapter } = require('@socket.io/redis-adapter');
  const pub = createClient({ url: process.env.REDIS_URL });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub, { key: process.env.REDIS_KEY || 'socket.io' }));
}

clusterAdapter().then(
  () =>
    httpServer.listen(port, host, () => {
      process.stderr.write(`socketio peer listening on ws://${host}:${port}/socket.io/\n`);
    }),
  (err) => {
    process.stderr.write(`socketio peer: Redis adapter: ${err}\n`);
    process.exit(1);
  },
);

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    io.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
