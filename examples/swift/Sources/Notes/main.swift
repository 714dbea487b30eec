// A small notes app on Cubby: notes live on this device, work offline, and sync to every other
// device of the same customer. Settings, as the other languages' examples: CUBBY_SERVER,
// CUBBY_CA, CUBBY_TOKEN_COMMAND, NOTES_DIR.
import Cubby
import Foundation

let env = ProcessInfo.processInfo.environment
let server = env["CUBBY_SERVER"] ?? "https://localhost:7443"
let ca = env["CUBBY_CA"] ?? "cubby-data/tls/cert.pem"
let tokenCommand = env["CUBBY_TOKEN_COMMAND"] ?? "target/debug/cubby-server dev-token --customer alice"
let device = URL(fileURLWithPath: env["NOTES_DIR"] ?? "notes-device")

/// Asks the identity provider (here, a command) for a token whenever Cubby connects.
final class CommandTokens: TokenProvider {
    func token(refresh: Bool) throws -> String {
        let words = tokenCommand.split(separator: " ").map(String.init)
        let process = Process()
        let out = Pipe()
        process.executableURL = URL(fileURLWithPath: words[0])
        process.arguments = Array(words.dropFirst())
        process.standardOutput = out
        try process.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw TokenError.Failed(reason: "\(tokenCommand) failed") }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// The key that encrypts this device's store. A real app keeps it in the Keychain.
func localKey() throws -> Data {
    let file = device.appendingPathComponent("local.key")
    if let key = try? Data(contentsOf: file) { return key }
    try FileManager.default.createDirectory(at: device, withIntermediateDirectories: true)
    var key = Data(count: 32)
    _ = key.withUnsafeMutableBytes { SecRandomCopyBytes(kSecRandomDefault, 32, $0.baseAddress!) }
    try key.write(to: file)
    return key
}

struct Note: Codable { var text: String; var done: Bool; var at: UInt64 }

let client = try await CubbyClient.open(
    config: ClientConfig(
        dataDir: device.appendingPathComponent("store").path, localKey: try localKey(),
        server: server, caPem: try? String(contentsOfFile: ca, encoding: .utf8),
        deviceName: "notes (Swift)", platform: "macos"),
    tokens: CommandTokens())
do { try await client.waitUntilSynced() } catch { print("(offline: \(error); this device's copy)") }
let doc: Document
if let found = try await client.list().first(where: { $0.title == "Notes" }) {
    doc = try await client.openDocument(id: found.id)
} else {
    doc = try await client.create(title: "Notes")
}

let args = CommandLine.arguments.dropFirst()
switch args.first {
case "add":
    let key = String(format: "%06x", UInt32.random(in: 0..<0x1000000))
    let note = Note(text: args.dropFirst().joined(separator: " "), done: false,
                    at: UInt64(Date().timeIntervalSince1970 * 1000))
    try await doc.put(key: key, json: String(decoding: try JSONEncoder().encode(note), as: UTF8.self))
    print("added \(key)")
case "done":
    let key = args.dropFirst().first!
    guard let json = doc.get(key: key) else { fatalError("no note \(key)") }
    var note = try JSONDecoder().decode(Note.self, from: Data(json.utf8))
    note.done = true  // only `done` changes: another device's edit of the text survives
    try await doc.put(key: key, json: String(decoding: try JSONEncoder().encode(note), as: UTF8.self))
case "list":
    let notes = try JSONDecoder().decode([String: Note].self, from: Data(doc.toJson().utf8))
    for (key, note) in notes.sorted(by: { $0.value.at < $1.value.at }) {
        print("\(key)  [\(note.done ? "x" : " ")] \(note.text)")
    }
default:
    print("usage: Notes add TEXT | list | done NOTE")
}
do { try await client.waitUntilSynced() } catch CubbyError.Offline {
    print("saved on this device; it syncs when the server is reachable")
}
await client.shutdown()
