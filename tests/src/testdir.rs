//! A temporary directory per test, and the logs written into it.
//!
//! Every process a test starts writes its output to a file in the test's
//! directory and registers it here. When the test fails (panics) while the
//! [`TestDir`] is alive, the tail of every log is printed (cargo shows it with
//! the failure) and the directory is kept; when it passes, the directory is
//! removed. Set `REMORA_TESTS_KEEP=1` to keep it anyway.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines of each log printed on failure.
const LOG_TAIL_LINES: usize = 200;

/// A unique directory under `std::env::temp_dir()/remora-tests/`.
pub struct TestDir {
    path: PathBuf,
    logs: Mutex<Vec<(String, PathBuf)>>,
}

impl TestDir {
    /// Creates `<tmp>/remora-tests/<name>-<pid>-<n>-<nanos>`.
    pub fn new(name: &str) -> TestDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir()
            .join("remora-tests")
            .join(format!("{name}-{}-{n}-{nanos}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("creating test directory {}: {e}", path.display());
        }
        TestDir {
            path,
            logs: Mutex::new(Vec::new()),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory (not created).
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A fresh, unused path inside the directory: `<stem>-<n>.<ext>`.
    pub fn unique_file(&self, stem: &str, ext: &str) -> PathBuf {
        (0..)
            .map(|n| self.path.join(format!("{stem}-{n}.{ext}")))
            .find(|p| !p.exists() && !self.is_registered(p))
            .unwrap_or_else(|| self.path.join(format!("{stem}.{ext}")))
    }

    fn is_registered(&self, path: &Path) -> bool {
        self.logs
            .lock()
            .map(|logs| logs.iter().any(|(_, p)| p == path))
            .unwrap_or(false)
    }

    /// Registers a log file to print if the test fails.
    pub fn register_log(&self, label: &str, path: &Path) {
        if let Ok(mut logs) = self.logs.lock() {
            logs.push((label.to_string(), path.to_path_buf()));
        }
    }

    /// Unwraps a test scenario's result, failing the test with the whole
    /// error chain (and so printing the logs) on `Err`.
    pub fn check<T, E: Debug>(&self, result: Result<T, E>) -> T {
        match result {
            Ok(v) => v,
            Err(e) => panic!("test failed: {e:?}"),
        }
    }

    /// Prints the tail of every registered log to stderr.
    pub fn print_logs(&self) {
        let logs = match self.logs.lock() {
            Ok(logs) => logs.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for (label, path) in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("<{e}>"));
            let lines: Vec<&str> = text.lines().collect();
            let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!(
                "----- {label}: {} (last {} of {} lines) -----",
                path.display(),
                lines.len() - skip,
                lines.len()
            );
            for line in &lines[skip..] {
                eprintln!("{line}");
            }
        }
        eprintln!("----- test directory kept at {} -----", self.path.display());
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        } else if std::env::var_os("REMORA_TESTS_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
