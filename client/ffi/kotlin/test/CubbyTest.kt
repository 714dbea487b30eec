// The Kotlin binding end to end against a real server: what an app relies on.
package dev.cubby.test

import dev.cubby.ClientConfig
import dev.cubby.CubbyClient
import dev.cubby.CubbyException
import dev.cubby.Document
import dev.cubby.DocumentEvent
import dev.cubby.DocumentListener
import dev.cubby.StatusListener
import dev.cubby.SyncStatus
import dev.cubby.TokenProvider
import dev.cubby.WipeReason
import java.io.File
import java.nio.file.Files
import java.security.SecureRandom
import java.util.concurrent.TimeUnit
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertNotNull
import kotlin.test.assertTrue
import kotlinx.coroutines.delay
import kotlinx.coroutines.runBlocking
import org.junit.After
import org.junit.Before
import org.junit.Test

const val DEADLINE_MS = 30_000L

/** A cubby-server in development mode on a free port, with its own data directory. */
class Server(root: File) {
    private val bin = System.getenv("CUBBY_SERVER_BIN") ?: error("CUBBY_SERVER_BIN is not set")
    private val data = File(root, "server")
    private val process: Process
    val url: String
    val caPem: String

    init {
        val out = File(root, "server.out")
        process = ProcessBuilder(bin, "--data", data.path, "--listen", "127.0.0.1:0")
            .redirectOutput(out)
            .redirectError(File(root, "server.log"))
            .start()
        val deadline = System.currentTimeMillis() + DEADLINE_MS
        var first: String? = null
        while (first == null) {
            first = out.readLines().firstOrNull { it.contains("listening on") }
            check(process.isAlive && System.currentTimeMillis() < deadline) { "cubby-server did not start" }
            if (first == null) Thread.sleep(20)
        }
        url = first.split(" ").last()
        caPem = File(data, "tls/cert.pem").readText()
    }

    fun token(customer: String): String {
        val p = ProcessBuilder(bin, "dev-token", "--data", data.path, "--customer", customer)
            .redirectError(ProcessBuilder.Redirect.DISCARD)
            .start()
        val token = p.inputStream.bufferedReader().readText().trim()
        check(p.waitFor(DEADLINE_MS, TimeUnit.MILLISECONDS) && p.exitValue() == 0) { "dev-token failed" }
        return token
    }

    fun stop() {
        process.destroy()
        process.waitFor(DEADLINE_MS, TimeUnit.MILLISECONDS)
    }
}

/** The app's identity provider, as the SDK asks it: here, the dev tenant's tokens. */
class Tokens(private val server: Server, private val customer: String) : TokenProvider {
    override fun token(refresh: Boolean): String = server.token(customer)
}

/** Records what the callbacks heard, for a test to wait on. */
class Recorder : StatusListener, DocumentListener {
    private val lock = Object()
    val heard = mutableListOf<Any>()

    private fun add(item: Any) = synchronized(lock) {
        heard.add(item)
        lock.notifyAll()
    }

    override fun onStatus(status: SyncStatus) = add(status)
    override fun onEvent(docId: String, event: DocumentEvent) = add(event)

    fun waitFor(what: String, predicate: (List<Any>) -> Boolean) = synchronized(lock) {
        val deadline = System.currentTimeMillis() + DEADLINE_MS
        while (!predicate(heard)) {
            val left = deadline - System.currentTimeMillis()
            check(left > 0) { "not within $DEADLINE_MS ms: $what; heard $heard" }
            lock.wait(left)
        }
    }

    fun snapshot(): List<Any> = synchronized(lock) { heard.toList() }
}

/** Awaits `check` until it is true, or fails after the deadline. */
suspend fun eventually(what: String, check: suspend () -> Boolean) {
    val deadline = System.currentTimeMillis() + DEADLINE_MS
    while (!check()) {
        check(System.currentTimeMillis() < deadline) { "not within $DEADLINE_MS ms: $what" }
        delay(50)
    }
}

class CubbyTest {
    private lateinit var root: File
    private lateinit var server: Server
    private val opened = mutableListOf<CubbyClient>()

    @Before
    fun start() {
        root = Files.createTempDirectory("cubby-kotlin").toFile()
        server = Server(root)
    }

    @After
    fun stop() = runBlocking {
        opened.forEach { it.shutdown(); it.close() }
        server.stop()
        root.deleteRecursively()
        Unit
    }

    private suspend fun device(customer: String, name: String, autosync: Boolean = true): CubbyClient {
        val key = ByteArray(32).also { SecureRandom().nextBytes(it) }
        val config = ClientConfig(
            dataDir = File(root, "$customer-$name").path,
            localKey = key,
            server = server.url,
            caPem = server.caPem,
            deviceName = name,
            platform = "jvm",
            autosync = autosync,
            retryPausesMs = listOf(50uL, 500uL),
        )
        return CubbyClient.open(config, Tokens(server, customer)).also { opened.add(it) }
    }

    private suspend fun holds(client: CubbyClient, id: String) = client.list().any { it.id == id }

    /** The phone's `doc` as the laptop holds it, once the laptop has every change to it. */
    private suspend fun onBoth(phone: CubbyClient, laptop: CubbyClient, doc: Document): Document {
        phone.waitUntilSynced()
        eventually("the laptop hears of the document") { holds(laptop, doc.id()) }
        val other = laptop.openDocument(doc.id())
        eventually("the laptop has it all") { other.toJson() == doc.toJson() }
        return other
    }

    @Test
    fun twoDevicesConvergeLive() = runBlocking {
        val phone = device("alice", "phone")
        val laptop = device("alice", "laptop")
        val doc = phone.create("Groceries")
        doc.put("milk", "2")
        val onLaptop = onBoth(phone, laptop, doc)
        assertEquals("2", onLaptop.get("milk"))

        val heard = Recorder()
        onLaptop.subscribe(heard).use {
            doc.put("eggs", """{"count": 12, "brown": true}""")
            heard.waitFor("the laptop is told of the phone's edit") { it.contains(DocumentEvent.Remote) }
            eventually("both hold the same document") { onLaptop.toJson() == doc.toJson() }
        }
        assertEquals("""{"brown":true,"count":12}""", onLaptop.get("eggs"))
        assertEquals(doc.heads(), onLaptop.heads())
    }

    @Test
    fun offlineEditsOnBothDevicesMerge() = runBlocking {
        val phone = device("alice", "phone")
        val laptop = device("alice", "laptop")
        val doc = phone.create("Profile")
        doc.put("address", """{"street": "Main St 1", "city": "Lyon"}""")
        doc.putText("note", "hello world")
        val other = onBoth(phone, laptop, doc)

        phone.pauseSync()
        laptop.pauseSync()
        doc.put("address", """{"street": "Main St 2", "city": "Lyon"}""")
        other.put("address", """{"street": "Main St 1", "city": "Paris"}""")
        doc.spliceText("note", 0uL, 0uL, "oh, ")
        other.spliceText("note", 11uL, 0uL, "!")
        assertEquals(listOf(doc.id()), phone.unsynced())
        phone.resumeSync()
        laptop.resumeSync()
        laptop.waitUntilSynced()
        eventually("both devices hold the merge") {
            phone.waitUntilSynced()
            doc.toJson() == other.toJson()
        }
        assertEquals("""{"city":"Paris","street":"Main St 2"}""", doc.get("address"))
        assertEquals("\"oh, hello world!\"", doc.get("note"))
    }

    @Test
    fun statusReportsConnectingSyncingAndUpToDate() = runBlocking {
        val phone = device("alice", "phone", autosync = false)
        repeat(5) { n -> phone.create("note $n").put("n", "$n") }
        assertEquals(5, phone.unsynced().size)
        val heard = Recorder()
        phone.subscribeStatus(heard).use {
            heard.waitFor("the current status") { it.isNotEmpty() }
            assertTrue(heard.snapshot()[0] is SyncStatus.Offline)
            phone.startSync()
            heard.waitFor("the phone is up to date") { it.contains(SyncStatus.UpToDate) }
        }
        val steps = heard.snapshot()
        val connecting = steps.indexOf(SyncStatus.Connecting)
        val syncing = steps.indexOfFirst { it is SyncStatus.Syncing && it.total == 5uL }
        val upToDate = steps.indexOf(SyncStatus.UpToDate)
        assertTrue(connecting in 0 until syncing && syncing < upToDate, "steps: $steps")
        assertEquals(emptyList(), phone.unsynced())
    }

    @Test
    fun revokedDeviceIsToldAndWiped() = runBlocking {
        val phone = device("alice", "phone")
        val stolen = device("alice", "stolen")
        val doc = stolen.create("Secrets")
        doc.put("pin", "1234")
        stolen.waitUntilSynced()
        val heard = Recorder()
        stolen.subscribeStatus(heard).use {
            val revoked = phone.revokeDevice(stolen.deviceId())
            assertEquals(stolen.deviceId(), revoked.id)
            assertNotNull(revoked.revokedMs)
            heard.waitFor("the revoked device is told to wipe") {
                it.contains(SyncStatus.Wiped(WipeReason.DEVICE_REVOKED))
            }
        }
        assertFailsWith<CubbyException.Wiped> { stolen.list() }
        assertFailsWith<CubbyException.Wiped> { stolen.openDocument(doc.id()) }
        val devices = phone.devices().associateBy { it.name }
        assertNotNull(devices.getValue("stolen").revokedMs)
        assertTrue(devices.getValue("phone").thisDevice)
    }

    @Test
    fun exportWritesABundle() = runBlocking {
        val phone = device("alice", "phone")
        val doc = phone.create("Orders")
        doc.put("order", """{"id": 7, "items": ["tea"]}""")
        phone.waitUntilSynced()
        val file = File(root, "export.tar")
        val size = phone.export(file.path)
        assertEquals(file.length().toULong(), size)
        // A tar archive: its headers name each file in plain ASCII.
        val bytes = String(file.readBytes(), Charsets.ISO_8859_1)
        assertTrue(bytes.contains("cubby-export/documents/${doc.id()}.json"))
        assertTrue(bytes.contains("\"tea\""), "the document's content is in the bundle")
    }

    @Test
    fun errorsAreTypedExceptionsWithCodes() = runBlocking {
        val phone = device("alice", "phone")
        assertFailsWith<CubbyException.UnknownDocument> { phone.openDocument("1".repeat(16)) }
        val doc = phone.create("Notes")
        doc.put("title", "\"plain string\"")
        val refused = assertFailsWith<CubbyException.InvalidChange> { doc.spliceText("title", 0uL, 0uL, "x") }
        assertTrue(refused.message!!.contains("text"))
        assertFailsWith<CubbyException.InvalidChange> { doc.put("bad", "{not json") }
        assertFailsWith<CubbyException.NotFound> { phone.revokeDevice("1".repeat(16)) }
        val shortKey = assertFailsWith<CubbyException.Config> {
            CubbyClient.open(ClientConfig(dataDir = File(root, "k").path, localKey = ByteArray(5)))
        }
        assertTrue(shortKey.message!!.contains("32 bytes"))
        Unit
    }
}
