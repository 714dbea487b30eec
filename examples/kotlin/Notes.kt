// A small notes app on Cubby for the JVM: notes live on this device, work offline, and sync to
// every other device of the same customer. Build and run it with ./run.sh (see README.md):
//
//   examples/kotlin/run.sh add buy milk
//   examples/kotlin/run.sh list
//   examples/kotlin/run.sh done <note>
//
// Settings, as the Python example's: CUBBY_SERVER, CUBBY_CA, CUBBY_TOKEN_COMMAND, NOTES_DIR.
package dev.cubby.examples

import dev.cubby.ClientConfig
import dev.cubby.CubbyClient
import dev.cubby.CubbyException
import dev.cubby.Document
import dev.cubby.TokenException
import dev.cubby.TokenProvider
import java.io.File
import java.security.SecureRandom
import kotlin.system.exitProcess
import kotlinx.coroutines.runBlocking

private fun setting(name: String, default: String) = System.getenv(name) ?: default

private val server = setting("CUBBY_SERVER", "https://localhost:7443")
private val ca = File(setting("CUBBY_CA", "cubby-data/tls/cert.pem"))
private val tokenCommand = setting("CUBBY_TOKEN_COMMAND", "target/debug/cubby-server dev-token --customer alice")
private val device = File(setting("NOTES_DIR", "notes-device"))

/** Asks the identity provider (here, a command) for a token whenever Cubby connects. */
class CommandTokens : TokenProvider {
    override fun token(refresh: Boolean): String {
        val process = ProcessBuilder(tokenCommand.split(" ")).start()
        val token = process.inputStream.bufferedReader().readText().trim()
        if (process.waitFor() != 0) throw TokenException.Failed("'$tokenCommand' failed")
        return token
    }
}

/** The key that encrypts this device's store. A real app keeps it in the Android Keystore. */
private fun localKey(): ByteArray {
    val file = File(device, "local.key")
    if (!file.exists()) {
        device.mkdirs()
        file.writeBytes(ByteArray(32).also { SecureRandom().nextBytes(it) })
    }
    return file.readBytes()
}

/** The customer's one notes document: found among those synced, or made on first use. */
private suspend fun notesDocument(client: CubbyClient): Document {
    try {
        client.waitUntilSynced()
    } catch (e: CubbyException) {
        System.err.println("(offline: ${e.message}; showing this device's copy)")
    }
    val found = client.list().firstOrNull { it.title == "Notes" }
    return if (found != null) client.openDocument(found.id) else client.create("Notes")
}

/** The notes as `key  [x] text` lines (a real app would parse `toJson()` with its JSON library). */
private fun show(doc: Document) {
    val keys = Regex("\"([0-9a-f]{6})\":").findAll(doc.toJson()).map { it.groupValues[1] }.toList()
    if (keys.isEmpty()) println("no notes yet: add one with `add TEXT`")
    for (key in keys) {
        val note = doc.get(key) ?: continue
        val text = Regex("\"text\":\"((?:[^\"\\\\]|\\\\.)*)\"").find(note)?.groupValues?.get(1) ?: ""
        println("$key  [${if (note.contains("\"done\":true")) "x" else " "}] $text")
    }
}

fun main(args: Array<String>) = runBlocking {
    val client = CubbyClient.open(
        ClientConfig(
            dataDir = File(device, "store").path,
            localKey = localKey(),
            server = server,
            caPem = if (ca.exists()) ca.readText() else null,
            deviceName = "notes (Kotlin)",
            platform = "jvm",
        ),
        CommandTokens(),
    )
    try {
        val doc = notesDocument(client)
        when (args.firstOrNull()) {
            "add" -> {
                val key = "%06x".format(SecureRandom().nextInt(0x1000000))
                val text = args.drop(1).joinToString(" ").replace("\\", "\\\\").replace("\"", "\\\"")
                doc.put(key, """{"text": "$text", "done": false, "at": ${System.currentTimeMillis()}}""")
                println("added $key")
            }
            // Only `done` changes: another device's edit of the text survives the merge.
            "done" -> doc.put(args[1], (doc.get(args[1]) ?: error("no note ${args[1]}")).replace("\"done\":false", "\"done\":true"))
            "list" -> { show(doc); return@runBlocking }
            else -> { System.err.println("usage: add TEXT | list | done NOTE"); exitProcess(2) }
        }
        try {
            client.waitUntilSynced()
        } catch (e: CubbyException.Offline) {
            println("saved on this device; it syncs when the server is reachable")
        }
    } finally {
        client.shutdown()
    }
}
