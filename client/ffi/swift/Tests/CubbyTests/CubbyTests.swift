// The Swift binding end to end against a real server: the scenarios of the Python and Kotlin
// tests. Not run on the project's machines (no Swift toolchain there): see README.md.
import Cubby
import Foundation
import XCTest

let deadline: TimeInterval = 30

/// A cubby-server in development mode on a free port, with its own data directory.
final class Server {
    let bin: String
    let data: URL
    let process = Process()
    var url = ""
    var caPem = ""

    init(root: URL) throws {
        guard let bin = ProcessInfo.processInfo.environment["CUBBY_SERVER_BIN"] else {
            throw NSError(domain: "set CUBBY_SERVER_BIN to the cubby-server to test against", code: 1)
        }
        self.bin = bin
        data = root.appendingPathComponent("server")
        let out = root.appendingPathComponent("server.out")
        FileManager.default.createFile(atPath: out.path, contents: nil)
        process.executableURL = URL(fileURLWithPath: bin)
        process.arguments = ["--data", data.path, "--listen", "127.0.0.1:0"]
        process.standardOutput = try FileHandle(forWritingTo: out)
        try process.run()
        let until = Date().addingTimeInterval(deadline)
        while true {
            let text = (try? String(contentsOf: out, encoding: .utf8)) ?? ""
            if let first = text.split(separator: "\n").first, first.contains("listening on") {
                url = String(first.split(separator: " ").last!)
                break
            }
            guard process.isRunning, Date() < until else {
                throw NSError(domain: "cubby-server did not start", code: 1)
            }
            Thread.sleep(forTimeInterval: 0.02)
        }
        caPem = try String(contentsOf: data.appendingPathComponent("tls/cert.pem"), encoding: .utf8)
    }

    func token(_ customer: String) throws -> String {
        let p = Process()
        let pipe = Pipe()
        p.executableURL = URL(fileURLWithPath: bin)
        p.arguments = ["dev-token", "--data", data.path, "--customer", customer]
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        try p.run()
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: out, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func stop() {
        process.terminate()
        process.waitUntilExit()
    }
}

/// The app's identity provider, as the SDK asks it: here, the dev tenant's tokens.
final class Tokens: TokenProvider, @unchecked Sendable {
    let server: Server
    let customer: String
    init(_ server: Server, _ customer: String) { self.server = server; self.customer = customer }
    func token(refresh: Bool) throws -> String {
        do { return try server.token(customer) } catch {
            throw TokenError.Failed(reason: "\(error)")
        }
    }
}

/// Records what the callbacks heard, for a test to wait on.
final class Recorder: StatusListener, DocumentListener, @unchecked Sendable {
    private let lock = NSCondition()
    private var statuses: [SyncStatus] = []
    private var events: [DocumentEvent] = []

    func onStatus(status: SyncStatus) { lock.lock(); statuses.append(status); lock.broadcast(); lock.unlock() }
    func onEvent(docId: String, event: DocumentEvent) { lock.lock(); events.append(event); lock.broadcast(); lock.unlock() }

    func heardStatuses() -> [SyncStatus] { lock.lock(); defer { lock.unlock() }; return statuses }

    func waitFor(_ what: String, _ predicate: ([SyncStatus], [DocumentEvent]) -> Bool) {
        let until = Date().addingTimeInterval(deadline)
        lock.lock()
        defer { lock.unlock() }
        while !predicate(statuses, events) {
            if !lock.wait(until: until) {
                XCTFail("not within \(deadline) s: \(what); heard \(statuses) \(events)")
                return
            }
        }
    }
}

func eventually(_ what: String, _ check: () async throws -> Bool) async throws {
    let until = Date().addingTimeInterval(deadline)
    while try await !check() {
        guard Date() < until else { return XCTFail("not within \(deadline) s: \(what)") }
        try await Task.sleep(nanoseconds: 50_000_000)
    }
}

final class CubbyTests: XCTestCase {
    var root: URL!
    var server: Server!
    var opened: [CubbyClient] = []

    override func setUpWithError() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        server = try Server(root: root)
    }

    override func tearDown() async throws {
        for client in opened { await client.shutdown() }
        server?.stop()
        try? FileManager.default.removeItem(at: root)
    }

    func device(_ customer: String, _ name: String, autosync: Bool = true) async throws -> CubbyClient {
        var key = Data(count: 32)
        key.withUnsafeMutableBytes { _ = SecRandomCopyBytes(kSecRandomDefault, 32, $0.baseAddress!) }
        let config = ClientConfig(
            dataDir: root.appendingPathComponent("\(customer)-\(name)").path, localKey: key,
            server: server.url, caPem: server.caPem, deviceName: name, platform: "swift",
            autosync: autosync, retryPausesMs: [50, 500])
        let client = try await CubbyClient.open(config: config, tokens: Tokens(server, customer))
        opened.append(client)
        return client
    }

    func holds(_ client: CubbyClient, _ id: String) async throws -> Bool {
        try await client.list().contains { $0.id == id }
    }

    func testTwoDevicesConvergeLive() async throws {
        let phone = try await device("alice", "phone")
        let laptop = try await device("alice", "laptop")
        let doc = try await phone.create(title: "Groceries")
        try await doc.put(key: "milk", json: "2")
        try await phone.waitUntilSynced()
        try await eventually("the laptop hears of the document") { try await self.holds(laptop, doc.id()) }
        let onLaptop = try await laptop.openDocument(id: doc.id())
        try await eventually("the first value arrives") { onLaptop.get(key: "milk") == "2" }

        let heard = Recorder()
        let subscription = onLaptop.subscribe(listener: heard)
        try await doc.put(key: "eggs", json: #"{"count": 12, "brown": true}"#)
        heard.waitFor("the laptop is told of the edit") { _, events in events.contains(.remote) }
        try await eventually("both hold the same document") { onLaptop.toJson() == doc.toJson() }
        subscription.cancel()
        XCTAssertEqual(onLaptop.get(key: "eggs"), #"{"brown":true,"count":12}"#)
        XCTAssertEqual(onLaptop.heads(), doc.heads())
    }

    func testOfflineEditsOnBothDevicesMerge() async throws {
        let phone = try await device("alice", "phone")
        let laptop = try await device("alice", "laptop")
        let doc = try await phone.create(title: "Profile")
        try await doc.put(key: "address", json: #"{"street": "Main St 1", "city": "Lyon"}"#)
        try await doc.putText(key: "note", text: "hello world")
        try await phone.waitUntilSynced()
        try await eventually("the laptop hears of the document") { try await self.holds(laptop, doc.id()) }
        let other = try await laptop.openDocument(id: doc.id())
        try await eventually("the laptop has it all") { other.get(key: "note") != nil }

        phone.pauseSync()
        laptop.pauseSync()
        try await doc.put(key: "address", json: #"{"street": "Main St 2", "city": "Lyon"}"#)
        try await other.put(key: "address", json: #"{"street": "Main St 1", "city": "Paris"}"#)
        try await doc.spliceText(key: "note", pos: 0, delete: 0, insert: "oh, ")
        try await other.spliceText(key: "note", pos: 11, delete: 0, insert: "!")
        phone.resumeSync()
        laptop.resumeSync()
        try await laptop.waitUntilSynced()
        try await eventually("both hold the merge") {
            try await phone.waitUntilSynced()
            return doc.toJson() == other.toJson()
        }
        XCTAssertEqual(doc.get(key: "address"), #"{"city":"Paris","street":"Main St 2"}"#)
        XCTAssertEqual(doc.get(key: "note"), #""oh, hello world!""#)
    }

    func testStatusReportsConnectingSyncingAndUpToDate() async throws {
        let phone = try await device("alice", "phone", autosync: false)
        for n in 0..<5 { try await phone.create(title: "note \(n)").put(key: "n", json: "\(n)") }
        let heard = Recorder()
        let subscription = phone.subscribeStatus(listener: heard)
        heard.waitFor("the current status") { statuses, _ in !statuses.isEmpty }
        phone.startSync()
        heard.waitFor("up to date") { statuses, _ in statuses.contains(.upToDate) }
        subscription.cancel()
        let steps = heard.heardStatuses()
        let connecting = steps.firstIndex(of: .connecting)
        let syncing = steps.firstIndex { if case .syncing(_, 5) = $0 { return true } else { return false } }
        let upToDate = steps.firstIndex(of: .upToDate)
        XCTAssertNotNil(connecting)
        XCTAssertNotNil(syncing)
        XCTAssertTrue(connecting! < syncing! && syncing! < upToDate!, "\(steps)")
        let unsynced = try await phone.unsynced()
        XCTAssertEqual(unsynced, [])
    }

    func testRevokedDeviceIsToldAndWiped() async throws {
        let phone = try await device("alice", "phone")
        let stolen = try await device("alice", "stolen")
        let doc = try await stolen.create(title: "Secrets")
        try await doc.put(key: "pin", json: "1234")
        try await stolen.waitUntilSynced()
        let heard = Recorder()
        let subscription = stolen.subscribeStatus(listener: heard)
        let revoked = try await phone.revokeDevice(id: stolen.deviceId())
        XCTAssertNotNil(revoked.revokedMs)
        heard.waitFor("told to wipe") { statuses, _ in statuses.contains(.wiped(reason: .deviceRevoked)) }
        subscription.cancel()
        do {
            _ = try await stolen.list()
            XCTFail("a wiped device lists nothing")
        } catch CubbyError.Wiped {}
    }

    func testExportWritesABundle() async throws {
        let phone = try await device("alice", "phone")
        let doc = try await phone.create(title: "Orders")
        try await doc.put(key: "order", json: #"{"id": 7, "items": ["tea"]}"#)
        try await phone.waitUntilSynced()
        let path = root.appendingPathComponent("export.tar").path
        let size = try await phone.export(path: path)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        XCTAssertEqual(UInt64(bytes.count), size)
        XCTAssertTrue(String(decoding: bytes, as: UTF8.self).contains("documents/\(doc.id()).json"))
    }

    func testErrorsAreTypedWithCodes() async throws {
        let phone = try await device("alice", "phone")
        do {
            _ = try await phone.openDocument(id: String(repeating: "1", count: 16))
            XCTFail("an unknown document opens")
        } catch CubbyError.UnknownDocument {}
        let doc = try await phone.create(title: "Notes")
        try await doc.put(key: "title", json: #""plain string""#)
        do {
            try await doc.spliceText(key: "title", pos: 0, delete: 0, insert: "x")
            XCTFail("a splice into a plain string is taken")
        } catch CubbyError.InvalidChange(let message) {
            XCTAssertTrue(message.contains("text"))
        }
        do {
            _ = try await CubbyClient.open(
                config: ClientConfig(dataDir: root.appendingPathComponent("k").path, localKey: Data(count: 5)))
            XCTFail("a short key is taken")
        } catch CubbyError.Config(let message) {
            XCTAssertTrue(message.contains("32 bytes"))
        }
    }
}
