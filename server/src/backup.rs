//! `cubby-server backup`: a consistent copy of the embedded store, in one file, while the server
//! runs.
//!
//! The running server listens on a Unix socket in its data directory (`<data>/control/socket`,
//! in a directory of mode 0700, and answering only its own user and root). `cubby-server backup` connects, sends
//! one line, `{"command":"backup"}`, and gets back one line of JSON (`{"ok":true,"bytes":N,
//! "flushes":N}`, or `{"error":"..."}`) followed by the archive, until the server closes the
//! connection. With no server running, the command opens the store itself.
//!
//! The store makes the copy with its writes paused ([`cubby_store::Store::copy_to`]), so it
//! holds the store as it was between two writes, every acknowledged change before it included;
//! then the archive is streamed from the copy with writes going again. The archive is a tar
//! of `db/` (a store directory: `sled/` and `keys/`) and, last, `backup.json` (what it is; an
//! archive cut short lacks it). Records
//! are copied as they are, sealed, and data keys stay wrapped: without the master key the
//! archive is unreadable. It holds neither the master key nor the witness; `cubby-server
//! restore --from FILE` puts it back and starts a new epoch, and devices then offer back what
//! they hold that it lacks.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use cubby_store::Store;

/// The archive's description of itself.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct Manifest {
    /// The archive format, 1.
    pub format: u32,
    /// When it was made, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Bytes of keys and values copied from the store.
    pub bytes: u64,
    /// Flushes the store had made durable when copied.
    pub flushes: u64,
    /// The server that made it.
    pub version: String,
}

/// The control socket's path in a data directory.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join("control").join("socket")
}

/// Scratch copies are named so in the data directory.
const SCRATCH_PREFIX: &str = "backup-";

/// Removes scratch copies a backup cut short (a crash) left in `data`.
pub(crate) fn remove_leftovers(data: &Path) {
    let Ok(entries) = std::fs::read_dir(data) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with(SCRATCH_PREFIX)) {
            tracing::info!(path = %entry.path().display(), "removing a backup's leftover copy");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Bytes the files under `dir` take.
fn size_of(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => size_of(&entry.path()),
            _ => entry.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// Refuses a copy that could fill the disk the store is on: the store's next write would then
/// fail, and a store that fails a write is read-only until a restart.
#[cfg(unix)]
fn room_for_copy(data: &Path) -> std::io::Result<()> {
    let needed = size_of(&data.join("db")).saturating_mul(2).saturating_add(64 << 20);
    let stat = nix::sys::statvfs::statvfs(data).map_err(std::io::Error::other)?;
    #[allow(clippy::useless_conversion, reason = "the counts are 32 bits on some targets")]
    let free = u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size()));
    if free < needed {
        return Err(std::io::Error::other(format!(
            "{} has {} MiB free; a backup first copies the store beside it and needs about {} MiB \
             (twice the store) to leave the store room to write",
            data.display(),
            free >> 20,
            needed >> 20
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn room_for_copy(_data: &Path) -> std::io::Result<()> {
    Ok(())
}

/// A scratch directory for a copy, beside the store, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies `store` into a scratch directory in `data`, and describes the copy.
fn copy(
    store: &dyn Store,
    data: &Path,
    flushes: impl Fn() -> u64,
) -> std::io::Result<(Scratch, Manifest)> {
    room_for_copy(data)?;
    let name = format!(
        "{SCRATCH_PREFIX}{}",
        bs58::encode(cubby_crypto::random_array::<6>()).into_string()
    );
    let scratch = Scratch(data.join(name));
    let bytes = store.copy_to(&scratch.0.join("db")).map_err(std::io::Error::other)?;
    let manifest = Manifest {
        format: 1,
        created_ms: cubby_core::meta::unix_ms(),
        bytes,
        flushes: flushes(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok((scratch, manifest))
}

/// Writes the archive of a copy to `out`: the store, then `backup.json` last, so that an
/// archive holding it is whole.
fn archive(copy: &Path, manifest: &Manifest, out: impl Write) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.append_dir_all("db", copy.join("db"))?;
    let json = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(manifest.created_ms / 1000);
    header.set_cksum();
    tar.append_data(&mut header, "backup.json", json.as_slice())?;
    tar.into_inner()?.flush()
}

/// Makes a backup of `store` (kept in `data`) and writes its archive to `out`: for the server's
/// control socket and for the command with no server running.
pub fn write_backup(
    store: &dyn Store,
    data: &Path,
    flushes: impl Fn() -> u64,
    mut out: impl Write,
    before_archive: impl FnOnce(&Manifest, &mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<Manifest> {
    let (scratch, manifest) = copy(store, data, flushes)?;
    before_archive(&manifest, &mut out)?;
    archive(&scratch.0, &manifest, &mut out)?;
    Ok(manifest)
}

/// Makes a backup with no server running: opens the store of `config` (checked against its
/// witness, as a start would) and writes the archive to `out`.
pub fn offline(
    config: &crate::ServerConfig,
    out: impl Write,
) -> Result<Manifest, crate::StartError> {
    use std::sync::Arc;
    #[cfg(unix)]
    {
        // Run as another user (root), opening the store could leave files the server cannot
        // write.
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&config.data).map(|m| m.uid()).ok();
        let me = nix::unistd::geteuid().as_raw();
        if owner.is_some_and(|owner| owner != me) {
            return Err(crate::ConfigError(format!(
                "no server answers on {}, and {} belongs to another user: run the backup as \
                 that user (sudo -u cubby ...), or with the server running",
                socket_path(&config.data).display(),
                config.data.display()
            ))
            .into());
        }
    }
    let master = cubby_crypto::keys::MasterSecret::read(&crate::master_key_path(config))?;
    let db_path = crate::store_path(config);
    let store_error = |source| crate::StartError::Store { path: db_path.clone(), source };
    let witness =
        cubby_store_sled::WitnessDir::open(&crate::witness_path(config)).map_err(store_error)?;
    let sled = cubby_store_sled::SledStore::open(&db_path).map_err(store_error)?;
    let keyring = cubby_crypto::keys::Keyring::from_master(&master);
    let vault = cubby_store::EncryptedStore::open_witnessed(sled, keyring, Arc::new(witness))
        .map_err(|source| crate::StartError::opening(config, source))?;
    write_backup(&vault, &config.data, || vault.flushes(), out, |_, _| Ok(()))
        .map_err(|e| crate::ConfigError(format!("backup: {e}")).into())
}

/// Reads a whole archive, to tell a complete one from one cut short.
pub fn check(file: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(std::fs::File::open(file)?);
    let mut manifest = false;
    for entry in archive.entries()? {
        let mut entry = entry?;
        manifest |= entry.path()?.as_os_str() == "backup.json";
        std::io::copy(&mut entry, &mut std::io::sink())?;
    }
    if !manifest {
        return Err(std::io::Error::other("the archive has no backup.json"));
    }
    Ok(())
}

/// Unpacks the archive `file` into `into` (created); returns its manifest. The store directory
/// is then `into/db`.
pub fn unpack(file: &Path, into: &Path) -> std::io::Result<Manifest> {
    let reader = std::fs::File::open(file)?;
    std::fs::create_dir_all(into)?;
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        let mut entry = entry?;
        // Files and directories only: a link could make the restore read any file.
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(std::io::Error::other(format!(
                "{} holds {} of a kind a backup never has",
                file.display(),
                entry.path()?.display()
            )));
        }
        // `unpack_in` keeps every entry inside `into` (no absolute paths, no `..`).
        entry.unpack_in(into)?;
    }
    let text = std::fs::read(into.join("backup.json")).map_err(|_| {
        std::io::Error::other(format!("{} is not a Cubby backup (no backup.json)", file.display()))
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| std::io::Error::other(format!("{}: backup.json: {e}", file.display())))?;
    if manifest.format != 1 {
        return Err(std::io::Error::other(format!(
            "{} is a backup of format {}; this server reads format 1",
            file.display(),
            manifest.format
        )));
    }
    Ok(manifest)
}

/// Asks the server running on `data` for a backup, writing the archive to `out`. `Ok(None)` when
/// no server answers on the control socket.
#[cfg(unix)]
pub fn request(data: &Path, out: impl Write) -> std::io::Result<Option<Manifest>> {
    let socket = socket_path(data);
    let mut stream = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(stream) => stream,
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(err) => {
            return Err(std::io::Error::other(format!("{}: {err}", socket.display())));
        }
    };
    stream.write_all(b"{\"command\":\"backup\"}\n")?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let answer: serde_json::Value = serde_json::from_str(&line).map_err(|_| {
        std::io::Error::other(format!("the server answered {:?}, not a backup", line.trim()))
    })?;
    if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
        return Err(std::io::Error::other(format!("the server could not back up: {error}")));
    }
    let manifest: Manifest = serde_json::from_value(answer)
        .map_err(|e| std::io::Error::other(format!("the server's answer: {e}")))?;
    copy_all(&mut reader, out)?;
    Ok(Some(manifest))
}

fn copy_all(from: &mut impl Read, mut to: impl Write) -> std::io::Result<()> {
    std::io::copy(from, &mut to)?;
    to.flush()
}

/// Serves backups on the control socket of `data` until `stop`.
#[cfg(unix)]
pub(crate) fn serve(
    data: &Path,
    store: std::sync::Arc<dyn Store>,
    flushes: std::sync::Arc<dyn Fn() -> u64 + Send + Sync>,
    tracker: &tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    remove_leftovers(data);
    let path = socket_path(data);
    let dir = path.parent().unwrap_or(data);
    // The socket's directory is the server user's alone, before the socket is made in it.
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    // A socket left by a server that did not stop cleanly: nothing listens on it.
    if std::os::unix::net::UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let me = nix::unistd::geteuid().as_raw();
    let data = data.to_path_buf();
    let jobs = tracker.clone();
    tracker.spawn(async move {
        let mut failures = crate::listen::AcceptFailures::new("control socket");
        while let Some((stream, _)) = failures.next(&stop, || listener.accept()).await {
            // Only this server's user, and root, may ask.
            let peer = stream.peer_cred().map(|c| c.uid());
            if !peer.as_ref().is_ok_and(|&uid| uid == me || uid == 0) {
                tracing::warn!(peer = ?peer, "control socket: refused a caller of another user");
                continue;
            }
            let Ok(stream) = stream.into_std() else { continue };
            let (store, flushes, data) = (store.clone(), flushes.clone(), data.clone());
            jobs.spawn_blocking(move || {
                if let Err(err) = answer(stream, &*store, &data, &*flushes) {
                    tracing::warn!(%err, "a backup on the control socket failed");
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

/// Answers one request on the control socket (blocking).
#[cfg(unix)]
fn answer(
    stream: std::os::unix::net::UnixStream,
    store: &dyn Store,
    data: &Path,
    flushes: &(dyn Fn() -> u64 + Send + Sync),
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    // A caller that stops reading gives up its backup rather than holding up a shutdown.
    stream.set_write_timeout(Some(std::time::Duration::from_secs(60)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.by_ref().take(1024).read_line(&mut line)?;
    let mut out = std::io::BufWriter::new(stream);
    let asked: Option<serde_json::Value> = serde_json::from_str(&line).ok();
    if asked.as_ref().and_then(|a| a.get("command")).and_then(|c| c.as_str()) != Some("backup") {
        let refusal =
            serde_json::json!({ "error": "unknown command; send {\"command\":\"backup\"}" });
        writeln!(out, "{refusal}")?;
        return out.flush();
    }
    let started = std::time::Instant::now();
    let made = write_backup(store, data, flushes, &mut out, |manifest, out| {
        let mut head = serde_json::to_value(manifest).map_err(std::io::Error::other)?;
        head["ok"] = true.into();
        writeln!(out, "{head}")
    });
    match made {
        Ok(manifest) => {
            tracing::info!(bytes = manifest.bytes, flushes = manifest.flushes,
                took = ?started.elapsed(), "backup made");
            Ok(())
        }
        Err(err) => {
            // Before the archive started, the client reads this line; after, a cut archive.
            let _ = writeln!(out, "{}", serde_json::json!({ "error": err.to_string() }));
            let _ = out.flush();
            Err(err)
        }
    }
}
