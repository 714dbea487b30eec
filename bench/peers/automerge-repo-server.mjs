// automerge-repo's sync server, as @automerge/automerge-repo-sync-server runs it: a Repo with the
// WebSocket server adapter and Node filesystem storage, announcing nothing (peers ask for
// documents by id). `node automerge-repo-server.mjs DATA_DIR PORT` listens on loopback.
import http from "node:http"
import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { NodeWSServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const [dir, port] = process.argv.slice(2)
if (!port) throw new Error("usage: node automerge-repo-server.mjs DATA_DIR PORT")
const sockets = new WebSocketServer({ noServer: true })
new Repo({
  network: [new NodeWSServerAdapter(sockets)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: "storage-server",
  sharePolicy: async () => false,
})
const server = http.createServer((_, res) => res.end("automerge-repo sync server\n"))
server.on("upgrade", (request, socket, head) => {
  sockets.handleUpgrade(request, socket, head, ws => sockets.emit("connection", ws, request))
})
server.listen(Number(port), "127.0.0.1")
