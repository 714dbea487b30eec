// Devices for the peers cubby-bench compares Cubby with: Automerge clients (automerge-repo's
// Repo with its WebSocket client adapter, as an app uses it) for automerge-repo's sync server and
// samod, and Yjs clients (y-websocket's provider) for y-sweet. All devices live in this process.
//
//   node driver.mjs automerge ws://127.0.0.1:PORT
//   node driver.mjs yjs ws://127.0.0.1:PORT
//
// cubby-bench writes one command per line on stdin and reads JSON lines on stdout:
//   {"run":"fanout","receivers":K,"edits":N,"gap_ms":G}  sets up, prints {"ready":true}
//   {"run":"idle","devices":N,"customers":C}             connects, prints {"ready":true,...}
//   go                                                    runs the measured part, prints the result
// cubby-bench reads the server's CPU time and memory between "ready" and the result.
import { createInterface } from "node:readline"
import { performance } from "node:perf_hooks"
import { randomUUID } from "node:crypto"
import { setTimeout as sleep } from "node:timers/promises"
import WebSocket from "ws"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import * as Y from "yjs"
import { WebsocketProvider } from "y-websocket"

const [proto, url] = process.argv.slice(2)
const PATIENCE_MS = 60_000
// y-websocket adds a process exit listener per provider; hundreds of devices are expected here.
process.setMaxListeners(0)
// A peer's server that resets connections under load (samod did, with 1,000 devices connected)
// makes the `ws` socket inside automerge-repo's client adapter emit an error nobody listens for,
// which would stop this process and the whole run; the adapter reconnects by itself. Say so and
// go on: the workload's figures show what the resets cost. Anything else still stops the run.
process.on("uncaughtException", e => {
  if (e?.code === "ECONNRESET" || e?.code === "EPIPE") {
    console.error(`driver: the server reset a connection (${e.code}); its device reconnects`)
    return
  }
  console.error(e)
  process.exit(1)
})

/** Bytes a `ws` WebSocket's TCP socket has carried, both ways (WebSocket framing, no TLS). */
const socketBytes = ws => (ws?._socket ? ws._socket.bytesRead + ws._socket.bytesWritten : 0)

/** automerge-repo devices: one Repo (in memory) per device, one WebSocket each. */
const automerge = {
  async device() {
    const adapter = new WebSocketClientAdapter(url)
    const repo = new Repo({ network: [adapter] })
    await repo.networkSubsystem.whenReady()
    return { repo, bytes: () => socketBytes(adapter.socket), close: () => repo.shutdown() }
  },
  async create(device) {
    return automergeDoc(device.repo.create({ n: 0 }))
  },
  async open(device, id) {
    const deadline = performance.now() + PATIENCE_MS
    for (;;) {
      try {
        return automergeDoc(await device.repo.find(id))
      } catch (e) {
        // Unavailable until the creator's first sync reaches the server.
        if (performance.now() > deadline) throw e
        await sleep(20)
      }
    }
  },
}

function automergeDoc(handle) {
  return {
    id: handle.url,
    set: n => handle.change(d => { d.n = n }),
    value: () => handle.doc()?.n,
    onChange: f => {
      handle.on("change", f)
      return () => handle.off("change", f)
    },
  }
}

/** Yjs devices for y-sweet: one y-websocket provider (one WebSocket) per open document. */
const yjs = {
  async device() {
    const providers = []
    return {
      providers,
      bytes: () => providers.reduce((sum, p) => sum + socketBytes(p.ws), 0),
      close: () => providers.forEach(p => p.destroy()),
    }
  },
  async create(device) {
    const doc = await yjs.open(device, randomUUID())
    doc.set(0)
    return doc
  },
  async open(device, id) {
    const ydoc = new Y.Doc()
    // y-sweet serves a document at /d/ID/ws/ID; y-websocket appends "/ID" to the URL it is given.
    const provider = new WebsocketProvider(`${url}/d/${id}/ws`, id, ydoc, {
      WebSocketPolyfill: WebSocket,
      disableBc: true,
    })
    device.providers.push(provider)
    await within(new Promise(resolve => provider.once("sync", resolve)), "initial sync")
    const root = ydoc.getMap("root")
    return {
      id,
      set: n => root.set("n", n),
      value: () => root.get("n"),
      onChange: f => {
        root.observe(f)
        return () => root.unobserve(f)
      },
    }
  },
}

const system = { automerge, yjs }[proto]
if (!system) throw new Error("usage: node driver.mjs automerge|yjs URL")

function within(promise, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within a minute`)), PATIENCE_MS)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** Resolves with the time at which `doc` holds `n`. */
function until(doc, n) {
  return within(
    new Promise(resolve => {
      if (doc.value() === n) return resolve(performance.now())
      const off = doc.onChange(() => {
        if (doc.value() === n) {
          off()
          resolve(performance.now())
        }
      })
    }),
    `edit ${n}`,
  )
}

function quantile(samples, q) {
  if (samples.length === 0) return 0
  const sorted = [...samples].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length, Math.max(1, Math.ceil(q * sorted.length))) - 1]
}

const round3 = x => Math.round(x * 1000) / 1000

/** One device edits; each edit waits until every receiver has it, then `gap_ms`. */
async function fanout({ receivers, edits, gap_ms }, go) {
  const writer = await system.device()
  const doc = await system.create(writer)
  const devices = [writer]
  const copies = []
  for (let i = 0; i < receivers; i++) {
    const device = await system.device()
    devices.push(device)
    const copy = await system.open(device, doc.id)
    await until(copy, 0)
    copies.push(copy)
  }
  await go()
  const bytes = () => devices.reduce((sum, d) => sum + d.bytes(), 0)
  const before = bytes()
  const latency = []
  for (let n = 1; n <= edits; n++) {
    // automerge-repo sends a document's changes at most every 100 ms: isolated edits are
    // spaced past that, so no edit waits on the throttle.
    await sleep(gap_ms)
    const started = performance.now()
    const arrivals = copies.map(copy => until(copy, n))
    doc.set(n)
    for (const at of await Promise.all(arrivals)) latency.push(at - started)
  }
  const wire = bytes() - before
  devices.forEach(d => d.close())
  return {
    receivers,
    edits,
    gap_ms,
    p50_ms: round3(quantile(latency, 0.5)),
    p99_ms: round3(quantile(latency, 0.99)),
    p999_ms: round3(quantile(latency, 0.999)),
    wire_bytes_per_change: Math.round(wire / edits),
  }
}

/** `devices` devices across `customers` documents (one per customer), all connected and idle. */
async function idle({ devices: count, customers }, go) {
  const started = performance.now()
  const devices = []
  const docs = []
  for (let first = 0; first < count; first += 100) {
    const batch = []
    for (let i = first; i < Math.min(count, first + 100); i++) {
      batch.push(
        (async () => {
          const device = await system.device()
          const customer = i % customers
          // The first device of each customer creates its document; later ones open it.
          if (i < customers) docs[customer] = await system.create(device)
          else await until(await system.open(device, docs[customer].id), 0)
          return device
        })(),
      )
    }
    devices.push(...(await Promise.all(batch)))
  }
  const connectionsPerSec = count / ((performance.now() - started) / 1000)
  await go({ connections_per_sec: Math.round(connectionsPerSec) })
  const result = { devices: count, customers }
  try {
    // One edit at that scale, from the last customer's first device to one more device of
    // theirs.
    const last = docs[docs.length - 1]
    const extra = await system.device()
    devices.push(extra)
    const copy = await within(system.open(extra, last.id), "a new device opening a document")
    const latency = []
    for (let n = 1; n <= 100; n++) {
      await sleep(110)
      const started = performance.now()
      const arrived = until(copy, n)
      last.set(n)
      latency.push((await arrived) - started)
    }
    result.edit_p50_ms = round3(quantile(latency, 0.5))
    result.edit_p99_ms = round3(quantile(latency, 0.99))
  } catch (e) {
    // Reported, not fatal: the memory figure stands on its own.
    result.edit_error = e.message
  }
  for (const d of devices) d.close()
  return result
}

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]()
const say = value => process.stdout.write(JSON.stringify(value) + "\n")
async function go(extra = {}) {
  say({ ready: true, ...extra })
  const { value } = await lines.next()
  if (value !== "go") throw new Error(`expected "go", got ${value}`)
}

for (;;) {
  const { value, done } = await lines.next()
  if (done) break
  const command = JSON.parse(value)
  const run = { fanout, idle }[command.run]
  if (!run) throw new Error(`unknown run ${command.run}`)
  say(await run(command, go))
}
process.exit(0)
