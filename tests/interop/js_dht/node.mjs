// A js-libp2p Kademlia DHT server (/ipfs/kad/1.0.0; TCP, Noise, yamux) that edgelink's
// py-libp2p DHT members bootstrap to, for tests/cache/test_dht_interop.py. With JS_RELAY=1 it
// is also a circuit relay v2 server (no per-circuit data or time limit), for
// tests/net/test_relay_interop.py.
//
// Prints one JSON line {"peer_id", "addrs"} on stdout once listening (JS_DHT_HOST, default
// 127.0.0.1; JS_DHT_PORT, default 0). Then answers JSON commands read one a line on stdin:
//   {"provide": "<multihash hex>"}  announces it (ADD_PROVIDER)  -> {"provided": hex}
//   {"connect": "<multiaddr>"}      dials a peer                 -> {"connected": peer id}
// A failed command answers {"error": message}. Exits on SIGTERM, SIGINT or when stdin closes.
//
// Keys: @libp2p/kad-dht decodes every ADD_PROVIDER / GET_PROVIDERS key as a CID and refuses the
// message ("Invalid CID") otherwise, so a remote key must be a bare sha2-256 multihash
// (0x12 0x20 + 32 bytes, a CIDv0) or whole CIDv1 bytes; a raw 32-byte digest is refused.
import { createInterface } from 'node:readline'

// Node 20 lacks Promise.withResolvers (Node 22), which js-libp2p 3 (yamux, ping, mortice's
// it-queue) calls; it is the only newer API the pinned tree uses, so it is added here, before
// the libp2p modules load (hence the dynamic imports below).
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { kadDHT, passthroughMapper } = await import('@libp2p/kad-dht')
const { ping } = await import('@libp2p/ping')
const { tcp } = await import('@libp2p/tcp')
const { multiaddr } = await import('@multiformats/multiaddr')
const { createLibp2p } = await import('libp2p')
const { circuitRelayServer } = await import('@libp2p/circuit-relay-v2')
const { CID } = await import('multiformats/cid')
const Digest = await import('multiformats/hashes/digest')

const host = process.env.JS_DHT_HOST ?? '127.0.0.1'
const port = process.env.JS_DHT_PORT ?? '0'
// js-libp2p's relay cuts a circuit after 2 minutes or 128 KiB by default: off here, so that the
// test measures the relaying, not the default limit
const relay = process.env.JS_RELAY === '1'
  ? { relay: circuitRelayServer({ reservations: { applyDefaultLimit: false } }) }
  : {}

const node = await createLibp2p({
  addresses: { listen: [`/ip4/${host}/tcp/${port}`] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    ping: ping(),
    dht: kadDHT({
      protocol: '/ipfs/kad/1.0.0',
      clientMode: false,
      // loopback and LAN addresses are the point here: keep them in answers
      peerInfoMapper: passthroughMapper,
      allowQueryWithZeroPeers: true
    }),
    ...relay
  }
})

const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

let stopping = false
async function stop () {
  if (stopping) return
  stopping = true
  try { await node.stop() } finally { process.exit(0) }
}

async function provide (hex) {
  const cid = CID.createV0(Digest.decode(Buffer.from(hex, 'hex')))
  await node.contentRouting.provide(cid, { signal: AbortSignal.timeout(15000) })
  return { provided: hex }
}

async function connect (addr) {
  const conn = await node.dial(multiaddr(addr), { signal: AbortSignal.timeout(10000) })
  return { connected: conn.remotePeer.toString() }
}

async function handle (line) {
  if (!line.trim()) return
  try {
    const cmd = JSON.parse(line)
    if (cmd.provide != null) say(await provide(cmd.provide))
    else if (cmd.connect != null) say(await connect(cmd.connect))
    else say({ error: `unknown command: ${line}` })
  } catch (err) {
    say({ error: String(err?.message ?? err) })
  }
}

process.on('SIGTERM', stop)
process.on('SIGINT', stop)
say({ peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })
const lines = createInterface({ input: process.stdin })
lines.on('line', (line) => { handle(line) })
lines.on('close', stop)
