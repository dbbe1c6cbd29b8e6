//! [`DirStore`]: the cluster state in a local directory, one JSON file per record.
//!
//! Layout: `<root>/<kind>/<id>.json` (e.g. `nodes/worker-1.json`), directories 0700, files
//! 0600, and the lock file `<root>/.lock`.
//!
//! - Writes are atomic: a temporary dot-file in the same directory, `fsync`, `rename` over the
//!   record, `fsync` of the directory. Readers never see half a record; a crash leaves at most
//!   a stray temporary file (ignored, and removed by the next [`DirStore::open`] once old).
//! - Every write takes an exclusive `flock` on the lock file, so compare-and-swap is atomic
//!   across tasks and processes: `flock` locks belong to open file descriptions, and every
//!   operation opens its own.
//! - Change notification: the watch rescans the directory and diffs against what it last saw
//!   (a file is re-read only when its inode, size or timestamps changed). inotify (the `notify`
//!   crate) only says *when* to rescan, plus a slow periodic rescan as a safety net. Why: inotify
//!   belongs to the file system, not to a network namespace, so agents in different network
//!   namespaces sharing the directory (the netns demo) see each other's writes at once; a
//!   rescan cannot miss or misorder anything even when inotify coalesces events or its queue
//!   overflows; and where inotify does not see other writers (NFS, 9p, FUSE) or cannot be set
//!   up, `poll_only` or the fallback turns the same rescan into bounded polling.
//! - No leases: a node record stays until deleted ([`StoreBackend::grant_lease`] returns a
//!   dummy lease). On one host, a dead agent is the operator's business.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::BoxStream;
use notify::Watcher as _;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::backend::{Backoff, LeaseId, RawEvent, StoreBackend};
use super::error::{RecordError, StoreError};
use super::record::{Key, Kind, MAX_RECORD_BYTES};

const BACKEND: &str = "directory";
const LOCK_FILE: &str = ".lock";
const SUFFIX: &str = ".json";
/// Temporary files older than this are left-overs of a crash.
const STALE_TEMP: Duration = Duration::from_secs(600);

/// Settings of the directory backend.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DirOptions {
    /// Don't use inotify; rescan every `poll_interval` (for file systems where inotify does
    /// not see other writers).
    pub poll_only: bool,
    /// Rescan period without inotify (polling).
    pub poll_interval: Duration,
    /// Rescan period with inotify, as a safety net.
    pub rescan_interval: Duration,
    /// Longest wait for the lock file.
    pub lock_timeout: Duration,
    /// Backoff of the watch while the directory is unreadable.
    pub backoff: Backoff,
}

impl Default for DirOptions {
    fn default() -> Self {
        Self {
            poll_only: false,
            poll_interval: Duration::from_millis(500),
            rescan_interval: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
        }
    }
}

/// The directory backend. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct DirStore {
    root: Arc<Path>,
    options: DirOptions,
}

impl DirStore {
    /// Opens (creating if needed) a store rooted at `root`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] if the directories or the lock file cannot be created.
    pub async fn open(root: impl Into<PathBuf>, options: DirOptions) -> Result<Self, StoreError> {
        let root: Arc<Path> = root.into().into();
        let setup_root = root.clone();
        blocking(move || setup(&setup_root)).await?;
        info!(root = %root.display(), poll_only = options.poll_only, "opened directory store");
        Ok(Self { root, options })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of a key, after checking that the key is a record key (so no path tricks).
    fn path_of(&self, key: &str) -> Result<(PathBuf, String), StoreError> {
        let parsed = Key::parse(key).map_err(|problem| RecordError {
            key: key.to_owned(),
            problem,
        })?;
        let dir = self.root.join(parsed.kind().as_str());
        let file = format!("{}{SUFFIX}", parsed.id_text());
        Ok((dir, file))
    }

    /// Runs `write` with the lock file locked.
    async fn locked<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    {
        let lock_path = self.root.join(LOCK_FILE);
        let timeout = self.options.lock_timeout;
        blocking(move || {
            let lock = open_lock(&lock_path)?;
            lock_with_timeout(&lock, &lock_path, timeout)?;
            let result = write();
            // Closing the file releases the lock too; unlocking first keeps the critical
            // section minimal if the close is slow.
            let _ = lock.unlock();
            result
        })
        .await
    }
}

fn setup(root: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder
        .create(root)
        .map_err(io_error("create directory", root))?;
    let meta = fs::metadata(root).map_err(io_error("stat", root))?;
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(root = %root.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "store directory is accessible to other users");
    }
    for kind in Kind::ALL {
        let dir = root.join(kind.as_str());
        builder
            .create(&dir)
            .map_err(io_error("create directory", &dir))?;
        remove_stale_temps(&dir);
    }
    open_lock(&root.join(LOCK_FILE))?;
    Ok(())
}

fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with('.') {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| now.duration_since(modified).unwrap_or_default() > STALE_TEMP);
        if old {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => info!(path = %path.display(), "removed stale temporary file"),
                Err(error) => debug!(path = %path.display(), %error, "cannot remove stale file"),
            }
        }
    }
}

fn open_lock(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_error("open lock file", path))
}

fn lock_with_timeout(lock: &File, path: &Path, timeout: Duration) -> Result<(), StoreError> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(100);
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(source)) => return Err(io_error("flock", path)(source)),
        }
        if start.elapsed() >= timeout {
            let waited = start.elapsed();
            return Err(io_error("lock", path)(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("still locked by another writer after {waited:?}"),
            )));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// A failed file system operation. Transient: a full disk, a directory moved away for a moment
/// or a lock held too long may all go away without anyone fixing nodeseal.
fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let subject = path.display().to_string();
    move |source| StoreError::Backend {
        backend: BACKEND,
        op,
        subject,
        transient: true,
        source: source.into(),
    }
}

/// Runs blocking file work off the runtime threads.
async fn blocking<T, F>(work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|join| StoreError::Backend {
            backend: BACKEND,
            op: "BUG: blocking file task",
            subject: String::new(),
            transient: false,
            source: join.into(),
        })?
}

/// The file's bytes, at most one past [`MAX_RECORD_BYTES`]: a larger file is refused as too
/// large when decoded, and must not cost its size in memory first (a sparse file of any
/// length takes no disk space).
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    use std::io::Read as _;
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error("read", path)(error)),
    };
    let limit = MAX_RECORD_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    Ok(Some(bytes))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync directory", dir))
}

/// Writes `dir/file` atomically: temporary file, fsync, rename, fsync of the directory.
fn write_atomic(dir: &Path, file: &str, value: &[u8]) -> Result<(), StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let temp = dir.join(format!(
        ".{file}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let target = dir.join(file);
    let result = (|| {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io_error("create", &temp))?;
        out.write_all(value).map_err(io_error("write", &temp))?;
        out.sync_all().map_err(io_error("fsync", &temp))?;
        fs::rename(&temp, &target).map_err(io_error("rename", &target))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn remove(dir: &Path, file: &str) -> Result<bool, StoreError> {
    let path = dir.join(file);
    match fs::remove_file(&path) {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(true)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(io_error("remove", &path)(error)),
    }
}

/// What identifies a file version without reading it. Writes replace files by rename, so a
/// change always brings a new inode; timestamps and size guard against inode reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

type Scan = BTreeMap<String, (Stamp, Vec<u8>)>;

/// Reads the records of one kind directory into `into`, re-reading only files whose stamp
/// changed since `previous` (their keys are added to `reread`). An unchanged file's entry is
/// moved out of `previous`, not copied, so an idle rescan neither reads nor copies a record;
/// what stays in `previous` is what changed or went away. A missing kind directory counts as
/// empty; an unreadable root is an error.
fn scan_kind(
    root: &Path,
    prefix: &str,
    previous: &mut Scan,
    into: &mut Scan,
    reread: &mut Vec<String>,
) -> Result<(), StoreError> {
    let dir = root.join(prefix);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            // Still an error if the root itself went away.
            fs::metadata(root).map_err(io_error("stat", root))?;
            return Ok(());
        }
        Err(error) => return Err(io_error("read directory", &dir)(error)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error("read directory", &dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            debug!(dir = %dir.display(), "ignoring file with non-UTF-8 name");
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let Some(id) = name.strip_suffix(SUFFIX) else {
            continue;
        };
        let key = format!("{prefix}/{id}");
        let path = entry.path();
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            // Deleted between listing and stat: it is simply gone.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(io_error("stat", &path)(error)),
        };
        if !meta.is_file() {
            continue;
        }
        let stamp = Stamp::of(&meta);
        if let Some((old, value)) = previous.remove(&key) {
            if old == stamp {
                into.insert(key, (stamp, value));
                continue;
            }
            // Changed: the old value stays for the diff.
            previous.insert(key.clone(), (old, value));
        }
        match read_optional(&path)? {
            Some(value) => {
                reread.push(key.clone());
                into.insert(key, (stamp, value));
            }
            None => continue,
        }
    }
    Ok(())
}

/// A rescan of every kind: the new view and the keys re-read (sorted). `previous` is left with
/// what changed or went away (see [`scan_kind`]); on error it is whole again.
fn scan_all(
    root: &Path,
    kinds: &[Kind],
    previous: &mut Scan,
) -> Result<(Scan, Vec<String>), StoreError> {
    let mut scan = Scan::new();
    let mut reread = Vec::new();
    for &kind in kinds {
        if let Err(error) = scan_kind(root, kind.as_str(), previous, &mut scan, &mut reread) {
            reread.sort();
            for (key, entry) in scan {
                if reread.binary_search(&key).is_err() {
                    previous.insert(key, entry);
                }
            }
            return Err(error);
        }
    }
    reread.sort();
    Ok((scan, reread))
}

/// Turns a rescan into change events, in key order: `old` is what the rescan left of the
/// previous view (changed or gone), `reread` the keys whose files were read again.
fn diff(old: &Scan, new: &Scan, reread: &[String]) -> Vec<RawEvent> {
    let mut events = Vec::new();
    for key in reread {
        let Some((_, value)) = new.get(key) else {
            continue;
        };
        if old.get(key).is_none_or(|(_, before)| before != value) {
            events.push(RawEvent::Put(key.clone(), value.clone()));
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            events.push(RawEvent::Delete(key.clone()));
        }
    }
    events
}

fn entries(scan: &Scan) -> Vec<(String, Vec<u8>)> {
    scan.iter()
        .map(|(key, (_, value))| (key.clone(), value.clone()))
        .collect()
}

/// Sets up inotify on the root, waking `wake` on changes other than our own temp/lock files
/// and plain reads.
fn make_watcher(root: &Path, wake: Arc<Notify>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            // Errors include queue overflows: rescan.
            Err(_) => true,
            Ok(event) => {
                !matches!(event.kind, notify::EventKind::Access(_))
                    && (event.paths.is_empty()
                        || event.paths.iter().any(|path| {
                            path.file_name()
                                .is_none_or(|name| !name.to_string_lossy().starts_with('.'))
                        }))
            }
        };
        if relevant {
            wake.notify_one();
        }
    })?;
    watcher.watch(root, notify::RecursiveMode::Recursive)?;
    Ok(watcher)
}

#[async_trait::async_trait]
impl StoreBackend for DirStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (dir, file) = self.path_of(key)?;
        blocking(move || read_optional(&dir.join(file))).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        if !Kind::ALL.iter().any(|kind| kind.as_str() == prefix) {
            return Ok(Vec::new());
        }
        let scan = blocking(move || {
            let mut scan = Scan::new();
            scan_kind(&root, &prefix, &mut Scan::new(), &mut scan, &mut Vec::new())?;
            Ok(scan)
        })
        .await?;
        Ok(entries(&scan))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        _lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let (dir, file) = self.path_of(key)?;
        self.locked(move || write_atomic(&dir, &file, &value)).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let (dir, file) = self.path_of(key)?;
        self.locked(move || remove(&dir, &file)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let (dir, file) = self.path_of(key)?;
        let expected = expected.map(<[u8]>::to_vec);
        self.locked(move || {
            let current = read_optional(&dir.join(&file))?;
            if current != expected {
                return Ok(false);
            }
            write_atomic(&dir, &file, &new)?;
            Ok(true)
        })
        .await
    }

    async fn grant_lease(&self, _ttl: Duration) -> Result<LeaseId, StoreError> {
        Ok(LeaseId(0))
    }

    async fn keep_alive(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Ok(())
    }

    async fn revoke_lease(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Ok(())
    }

    fn watch(&self, kinds: &[Kind]) -> BoxStream<'static, RawEvent> {
        let root = self.root.clone();
        let kinds: Arc<[Kind]> = kinds.into();
        let options = self.options.clone();
        Box::pin(async_stream::stream! {
            let wake = Arc::new(Notify::new());
            let mut watcher = None;
            let mut state = Scan::new();
            let mut sent_snapshot = false;
            let mut failures = 0u32;
            loop {
                if watcher.is_none() && !options.poll_only {
                    match make_watcher(&root, wake.clone()) {
                        Ok(w) => watcher = Some(w),
                        Err(error) => warn!(root = %root.display(), %error,
                            "inotify unavailable, polling the store directory"),
                    }
                }
                let scan_root = root.clone();
                let scan_kinds = kinds.clone();
                let mut previous = std::mem::take(&mut state);
                let (previous, result) = match blocking(move || {
                    let result = scan_all(&scan_root, &scan_kinds, &mut previous);
                    Ok((previous, result))
                })
                .await
                {
                    Ok(pair) => pair,
                    // The scan task died; the next good scan resyncs in full anyway.
                    Err(error) => (Scan::new(), Err(error)),
                };
                match result {
                    Ok((scan, reread)) => {
                        if !sent_snapshot {
                            yield RawEvent::Snapshot { entries: entries(&scan), resync: false };
                            sent_snapshot = true;
                        } else if failures > 0 {
                            info!(root = %root.display(), "store directory readable again");
                            yield RawEvent::Snapshot { entries: entries(&scan), resync: true };
                        } else {
                            for event in diff(&previous, &scan, &reread) {
                                yield event;
                            }
                        }
                        failures = 0;
                        state = scan;
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        state = previous;
                        if failures == 1 {
                            yield RawEvent::Interrupted(error);
                        } else {
                            debug!(root = %root.display(), %error, failures,
                                "store directory still unreadable");
                        }
                        // inotify watches die with the directory: set up again after recovery.
                        watcher = None;
                        tokio::time::sleep(options.backoff.delay(failures)).await;
                        continue;
                    }
                }
                let period = if watcher.is_some() { options.rescan_interval } else { options.poll_interval };
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(period) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use futures::StreamExt as _;

    use super::*;
    use crate::test_helpers::node_record;
    use crate::{Event, NodeName, NodeRecord, RecordKind as _, Store};

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_huge_record_file_is_read_only_up_to_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("huge");
        // 96 MiB that take no disk space.
        File::create(&path)
            .and_then(|f| f.set_len(96 << 20))
            .expect("sparse file");
        let bytes = read_optional(&path).expect("read").expect("present");
        assert_eq!(bytes.len(), MAX_RECORD_BYTES + 1);
        assert_eq!(
            read_optional(&dir.path().join("absent")).expect("read"),
            None
        );
    }

    #[test]
    fn a_rescan_rereads_only_changed_files_and_reports_puts_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = dir.path().join("nodes");
        fs::create_dir_all(&nodes).expect("mkdir");
        for name in ["a", "b", "c"] {
            write_atomic(&nodes, &format!("{name}.json"), name.as_bytes()).expect("write");
        }
        let kinds = [Kind::Node];
        let (first, reread) = scan_all(dir.path(), &kinds, &mut Scan::new()).expect("scan");
        assert_eq!(reread, ["nodes/a", "nodes/b", "nodes/c"]);

        // Nothing changed: nothing read again, no events, the values moved over.
        let mut previous = first;
        let (second, reread) = scan_all(dir.path(), &kinds, &mut previous).expect("scan");
        assert!(reread.is_empty() && previous.is_empty());
        assert!(diff(&previous, &second, &reread).is_empty());
        assert_eq!(entries(&second).len(), 3);

        // b rewritten with other bytes, c rewritten with the same bytes, a deleted.
        write_atomic(&nodes, "b.json", b"B").expect("write");
        write_atomic(&nodes, "c.json", b"c").expect("write");
        fs::remove_file(nodes.join("a.json")).expect("rm");
        let mut previous = second;
        let (third, reread) = scan_all(dir.path(), &kinds, &mut previous).expect("scan");
        assert_eq!(reread, ["nodes/b", "nodes/c"]);
        let events: Vec<String> = diff(&previous, &third, &reread)
            .into_iter()
            .map(|e| match e {
                RawEvent::Put(key, value) => {
                    format!("put {key} {}", String::from_utf8_lossy(&value))
                }
                RawEvent::Delete(key) => format!("delete {key}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(events, ["put nodes/b B", "delete nodes/a"]);
    }

    #[tokio::test]
    async fn an_oversized_record_is_refused_naming_it_and_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        store.put(&node_record("a", 1)).await.expect("put");
        let file = dir.path().join("nodes/a.json");
        File::create(&file)
            .and_then(|f| f.set_len(96 << 20))
            .expect("sparse record");
        let error = store
            .get::<NodeRecord>(&name("a"))
            .await
            .expect_err("a 96 MiB record");
        let text = error.to_string();
        assert!(text.contains("nodes/a"), "{text}");
        assert!(text.contains("more than the limit of 1048576"), "{text}");
    }

    async fn open(root: &Path) -> Store {
        Store::new(
            DirStore::open(root, DirOptions::default())
                .await
                .expect("open store"),
        )
    }

    fn name(text: &str) -> NodeName {
        NodeName::new(text).expect("test node name")
    }

    async fn next(events: &mut BoxStream<'static, Event>) -> Event {
        tokio::time::timeout(WAIT, events.next())
            .await
            .expect("store event within 10 s")
            .expect("watch streams never end")
    }

    #[tokio::test]
    async fn files_are_private_and_written_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("state");
        let store = open(&root).await;
        store.put(&node_record("a", 1)).await.expect("put a");
        store.put(&node_record("b", 2)).await.expect("put b");
        store.put(&node_record("a", 3)).await.expect("overwrite a");

        let file = root.join("nodes/a.json");
        let mode = fs::metadata(&file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = fs::metadata(&root).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Nothing but the records: no temporary files left behind.
        let mut names: Vec<String> = fs::read_dir(root.join("nodes"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "b.json"]);
    }

    /// Files that are not records (other suffixes, dot-files such as a crashed writer's
    /// temporary file) are not invalid records: they are not reported at all.
    #[tokio::test]
    async fn files_that_are_not_records_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        store.put(&node_record("good", 1)).await.expect("put");
        fs::write(dir.path().join("nodes/notes.txt"), b"hello").expect("write");
        fs::write(dir.path().join("nodes/.partial.json.1.tmp"), b"{").expect("write");
        let listing = store.list::<NodeRecord>().await.expect("list");
        assert_eq!(listing.records, vec![node_record("good", 1)]);
        assert!(listing.invalid.is_empty(), "{:?}", listing.invalid);
        let mut events = store.watch(&[Kind::Node]);
        match next(&mut events).await {
            Event::Snapshot(snapshot) => {
                assert_eq!(snapshot.records.len(), 1);
                assert!(snapshot.invalid.is_empty(), "{:?}", snapshot.invalid);
            }
            other => panic!("expected Snapshot, got {other:?}"),
        }
    }

    async fn watch_sees_other_instance(options: DirOptions) {
        let dir = tempfile::tempdir().expect("tempdir");
        let watcher = Store::new(DirStore::open(dir.path(), options).await.expect("open"));
        let writer = open(dir.path()).await;
        writer.put(&node_record("before", 1)).await.expect("put");

        let mut events = watcher.watch(&[Kind::Node, Kind::RekeyGeneration]);
        match next(&mut events).await {
            Event::Snapshot(snapshot) => {
                assert_eq!(
                    snapshot.records,
                    vec![node_record("before", 1).into_record()]
                );
            }
            other => panic!("expected Snapshot, got {other:?}"),
        }
        writer.put(&node_record("after", 2)).await.expect("put");
        match next(&mut events).await {
            Event::Put(record) => assert_eq!(record, node_record("after", 2).into_record()),
            other => panic!("expected Put, got {other:?}"),
        }
        // A kind not watched: no event; the next one is the delete.
        writer
            .put(&crate::TrustBundle {
                bundle: "{}".to_owned(),
                signature: None,
                signer_pem: None,
            })
            .await
            .expect("put bundle");
        writer
            .delete::<NodeRecord>(&name("before"))
            .await
            .expect("delete");
        match next(&mut events).await {
            Event::Deleted(key) => assert_eq!(key, NodeRecord::key_of(&name("before"))),
            other => panic!("expected Deleted, got {other:?}"),
        }
        assert_eq!(writer.bump_rekey_generation().await.expect("bump"), 1);
        match next(&mut events).await {
            Event::Put(crate::Record::RekeyGeneration(r)) => assert_eq!(r.generation, 1),
            other => panic!("expected the rekey generation, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn watch_sees_puts_and_deletes_of_another_instance_inotify() {
        watch_sees_other_instance(DirOptions {
            // Long safety-net rescans: only inotify can deliver within the 10 s wait.
            rescan_interval: Duration::from_secs(3600),
            ..DirOptions::default()
        })
        .await;
    }

    #[tokio::test]
    async fn watch_sees_puts_and_deletes_of_another_instance_polling() {
        watch_sees_other_instance(DirOptions {
            poll_only: true,
            poll_interval: Duration::from_millis(50),
            ..DirOptions::default()
        })
        .await;
    }

    /// Where [`netns_child_writer`] writes when it runs as the child of
    /// [`watch_sees_a_process_in_another_network_namespace`].
    const CHILD_ROOT_ENV: &str = "NODESEAL_STORE_TEST_CHILD_ROOT";

    /// The writer process of the cross-namespace test (run by it through `unshare --net`).
    /// Run alone, it writes into a temporary directory and checks the result itself.
    #[tokio::test]
    #[ignore = "child process of watch_sees_a_process_in_another_network_namespace"]
    async fn netns_child_writer() {
        let temp = tempfile::tempdir().expect("tempdir");
        let root =
            std::env::var_os(CHILD_ROOT_ENV).map_or_else(|| temp.path().to_owned(), PathBuf::from);
        let netns = fs::read_link("/proc/self/ns/net").expect("read own network namespace");
        println!("child-netns={}", netns.display());
        let store = open(&root).await;
        store
            .put(&node_record("from-child", 7))
            .await
            .expect("child put");
        let generation = store.bump_rekey_generation().await.expect("child bump");
        assert!(generation >= 1);
        assert!(
            store
                .get::<NodeRecord>(&name("from-child"))
                .await
                .expect("get")
                .is_some()
        );
    }

    /// Agents of the netns demo run in different network namespaces and share one store
    /// directory: a write by a process in another network namespace reaches the watch through
    /// inotify (long safety-net rescan, so polling cannot be what delivers it).
    #[tokio::test]
    async fn watch_sees_a_process_in_another_network_namespace() {
        let test = "watch_sees_a_process_in_another_network_namespace";
        let probe = std::process::Command::new("unshare")
            .args(["--net", "true"])
            .output();
        if !probe.as_ref().is_ok_and(|o| o.status.success()) {
            let reason =
                format!("`unshare --net` unavailable (needs root and util-linux): {probe:?}");
            assert!(
                !crate::test_helpers::require_everything(),
                "{test}: {reason}, and NODESEAL_REQUIRE_PRIVILEGED=1"
            );
            println!("SKIPPED {test}: {reason}");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let options = DirOptions {
            rescan_interval: Duration::from_secs(3600),
            ..DirOptions::default()
        };
        let store = Store::new(DirStore::open(dir.path(), options).await.expect("open"));
        let mut events = store.watch(&[Kind::Node, Kind::RekeyGeneration]);
        assert!(matches!(next(&mut events).await, Event::Snapshot(s) if s.records.is_empty()));

        let exe = std::env::current_exe().expect("test binary path");
        let child = tokio::process::Command::new("unshare")
            .arg("--net")
            .arg(exe)
            .args([
                "--exact",
                "dir::tests::netns_child_writer",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ROOT_ENV, dir.path())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), child)
            .await
            .expect("child finishes within 60 s")
            .expect("spawn child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let own = fs::read_link("/proc/self/ns/net").expect("own network namespace");
        let child_netns = stdout
            .lines()
            .find_map(|line| line.strip_prefix("child-netns="))
            .expect("child reports its network namespace");
        assert_ne!(
            child_netns,
            own.to_string_lossy(),
            "child must run in another network namespace"
        );

        let mut seen = BTreeSet::new();
        while seen.len() < 2 {
            match next(&mut events).await {
                Event::Put(record) => {
                    seen.insert(record.key().to_string());
                }
                other => panic!("expected the child's records, got {other:?}"),
            }
        }
        assert_eq!(
            seen,
            BTreeSet::from(["nodes/from-child".to_owned(), "rekey/cluster".to_owned()])
        );
    }

    /// A writer holding the lock longer than `lock_timeout` makes writes fail with a transient
    /// error naming the backend, the operation and the lock file; reads do not need the lock.
    #[tokio::test]
    async fn a_held_lock_times_out_with_a_transient_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = DirOptions {
            lock_timeout: Duration::from_millis(100),
            ..DirOptions::default()
        };
        let store = Store::new(DirStore::open(dir.path(), options).await.expect("open"));
        store.put(&node_record("a", 1)).await.expect("put");

        let lock_path = dir.path().join(LOCK_FILE);
        let held = open_lock(&lock_path).expect("open lock file");
        held.lock().expect("hold the lock");
        let error = store
            .put(&node_record("b", 2))
            .await
            .expect_err("put while another writer holds the lock");
        assert!(
            matches!(
                &error,
                StoreError::Backend {
                    backend: "directory",
                    op: "lock",
                    transient: true,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(error.is_transient());
        assert_eq!(
            error.to_string(),
            format!("directory store: lock {} failed", lock_path.display())
        );
        assert_eq!(
            store.get::<NodeRecord>(&name("a")).await.expect("get"),
            Some(node_record("a", 1))
        );
        held.unlock().expect("release the lock");
        store
            .put(&node_record("b", 2))
            .await
            .expect("put after release");
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path(), DirOptions::default())
            .await
            .expect("open");
        for key in ["nodes/../../etc/passwd", "../x", "nodes/.lock", "nodes/a/b"] {
            assert!(
                matches!(store.get(key).await, Err(StoreError::Invalid(_))),
                "{key}"
            );
            assert!(
                matches!(
                    store.put(key, b"{}".to_vec(), None).await,
                    Err(StoreError::Invalid(_))
                ),
                "{key}"
            );
        }
    }
}
