// An evhub client built on third-party netstring libraries from npm, driven by
// tests/integration/test_node_client.py. It proves that a stock netstring implementation, used as
// its authors intend, interoperates with evhub unchanged.
//
//   node client.mjs --lib endo|legacy HOST PORT
//
//   --lib endo    @endo/netstring: makeNetstringWriter over a {next,return,throw} adapter of the
//                 net.Socket, makeNetstringReader over the socket's async iterator.
//   --lib legacy  netstring 0.3.0: nsWrite() to encode, netstring.Stream to decode.
//
// Commands arrive on stdin, one JSON object a line; results go to stdout, one JSON object a line.
// Payloads travel as base64 ("b64") so that any byte survives.
//
//   {"op":"send","b64":"..."}          one frame through the library's writer
//   {"op":"send","b64":["..","..."]}   endo only: one frame given as several chunks (the writer
//                                      concatenates them; exercises its Uint8Array[] form)
//   {"op":"batch","b64":["..",...]}    several frames back to back without waiting in between
//   {"op":"raw","b64":"..."}           bytes written to the socket bypassing the library
//   {"op":"end"}                       close our side (writer.return()), then read to EOF
//
//   -> {"event":"connected","port":LOCALPORT}
//   -> {"event":"sent","seq":N}         after the library's writer accepted command N (1-based)
//   -> {"event":"frame","b64":"...","len":N}   every frame the library's reader yields, in order
//   -> {"event":"eof"}                  the reader finished cleanly (the hub closed)
//   -> {"event":"error","where":"...","message":"..."}   then exit status 1
//
// The process exits 0 after "eof" once stdin is closed or "end" was processed.

import net from 'node:net';
import readline from 'node:readline';
import { createRequire } from 'node:module';
import { makeNetstringReader, makeNetstringWriter } from '@endo/netstring';

const require = createRequire(import.meta.url);
const legacy = require('netstring');

const emit = obj => process.stdout.write(`${JSON.stringify(obj)}\n`);

const fail = (where, err) => {
  emit({ event: 'error', where, message: String(err && err.stack ? err.stack : err) });
  process.exit(1);
};

const usage = () => {
  process.stderr.write('usage: node client.mjs --lib endo|legacy HOST PORT\n');
  process.exit(2);
};

const argv = process.argv.slice(2);
if (argv.length !== 4 || argv[0] !== '--lib' || !['endo', 'legacy'].includes(argv[1])) usage();
const lib = argv[1];
const host = argv[2];
const port = Number(argv[3]);
if (!Number.isInteger(port) || port <= 0 || port > 65535) usage();

const fromB64 = s => Buffer.from(s, 'base64');
const toB64 = u8 => Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength).toString('base64');

// The {next, return, throw} writer that @endo/netstring expects, over a net.Socket. next()
// settles once Node has handed the bytes to the kernel, so the library's backpressure holds.
const socketWriter = sock => ({
  next(chunk) {
    return new Promise((resolve, reject) => {
      sock.write(chunk, err => (err ? reject(err) : resolve({ done: false, value: undefined })));
    });
  },
  return() {
    return new Promise(resolve => {
      sock.end(() => resolve({ done: true, value: undefined }));
    });
  },
  throw(err) {
    sock.destroy(err);
    return Promise.resolve({ done: true, value: undefined });
  },
  [Symbol.asyncIterator]() {
    return this;
  },
});

const sock = net.createConnection({ host, port });
sock.setNoDelay(true);

let readerDone = false;
let inputDone = false;
const maybeExit = () => {
  if (readerDone && inputDone) process.exit(0);
};

let writeFrame; // (Buffer | Buffer[]) -> Promise
let endWriter; // () -> Promise

sock.once('error', err => fail('socket', err));

sock.once('connect', () => {
  sock.removeAllListeners('error');
  if (lib === 'endo') {
    const writer = makeNetstringWriter(socketWriter(sock));
    writeFrame = payload => writer.next(payload);
    endWriter = () => writer.return(undefined);
    const reader = makeNetstringReader(sock, { name: `evhub ${host}:${port}` });
    (async () => {
      for await (const frame of reader) {
        emit({ event: 'frame', b64: toB64(frame), len: frame.length });
      }
      readerDone = true;
      emit({ event: 'eof' });
      maybeExit();
    })().catch(err => fail('reader', err));
    sock.on('error', err => fail('socket', err));
  } else {
    writeFrame = payload => {
      if (Array.isArray(payload)) throw new Error('the legacy library takes one buffer a frame');
      return new Promise((resolve, reject) => {
        sock.write(legacy.nsWrite(payload), err => (err ? reject(err) : resolve()));
      });
    };
    endWriter = () => new Promise(resolve => sock.end(resolve));
    const stream = new legacy.Stream(sock);
    stream.on('data', frame => emit({ event: 'frame', b64: toB64(frame), len: frame.length }));
    stream.on('error', err => fail('reader', err));
    sock.on('error', err => fail('socket', err));
    sock.on('end', () => {
      if (stream.buf && stream.buf.length) {
        fail('reader', new Error(`${stream.buf.length} bytes of an incomplete frame at EOF`));
      }
      readerDone = true;
      emit({ event: 'eof' });
      maybeExit();
    });
  }
  emit({ event: 'connected', port: sock.localPort });
  runCommands().catch(err => fail('command', err));
});

async function runCommands() {
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  let seq = 0;
  let ended = false;
  for await (const line of rl) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line);
    seq += 1;
    switch (cmd.op) {
      case 'send':
        await writeFrame(Array.isArray(cmd.b64) ? cmd.b64.map(fromB64) : fromB64(cmd.b64));
        break;
      case 'batch':
        await Promise.all(cmd.b64.map(b => writeFrame(fromB64(b))));
        break;
      case 'raw':
        await new Promise((resolve, reject) => {
          sock.write(fromB64(cmd.b64), err => (err ? reject(err) : resolve()));
        });
        break;
      case 'end':
        if (!ended) await endWriter();
        ended = true;
        break;
      default:
        throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
    }
    emit({ event: 'sent', seq });
  }
  inputDone = true;
  maybeExit();
}
