//! Subscribed resource names, interned: thousands of sidecars subscribe to
//! the same names (every sidecar's EDS subscription names every cluster
//! it was sent), so each distinct set is kept once and streams share it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use xxhash_rust::xxh3::Xxh3;

/// A set of subscribed names, shared between the streams that subscribe
/// to exactly these.
pub type Names = Arc<BTreeSet<String>>;

/// Live sets by content hash (a hash shared by different sets keeps the
/// latest: the others simply stay unshared).
static INTERNED: LazyLock<Mutex<HashMap<u64, Weak<BTreeSet<String>>>>> =
    LazyLock::new(Mutex::default);

/// The shared copy of `names`.
pub fn intern(names: BTreeSet<String>) -> Names {
    if names.is_empty() {
        return Names::default();
    }
    let mut hasher = Xxh3::new();
    for name in &names {
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
    }
    let key = hasher.digest();
    let mut interned = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(live) = interned.get(&key).and_then(Weak::upgrade)
        && *live == names
    {
        return live;
    }
    let names = Arc::new(names);
    interned.insert(key, Arc::downgrade(&names));
    // Forget sets nobody holds any more, whenever the table has doubled.
    if interned.len().is_power_of_two() && interned.len() >= 64 {
        interned.retain(|_, set| set.strong_count() > 0);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_sets_are_shared_and_forgotten_when_unused() {
        let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let a = intern(set(&["x", "y"]));
        let b = intern(set(&["y", "x"]));
        assert!(Arc::ptr_eq(&a, &b));
        let c = intern(set(&["x"]));
        assert!(!Arc::ptr_eq(&a, &c));
        drop((a, b));
        let d = intern(set(&["x", "y"]));
        assert_eq!(Arc::strong_count(&d), 1, "a new set once the old is gone");
    }
}
