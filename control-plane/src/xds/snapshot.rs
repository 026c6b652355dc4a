//! A snapshot: one version of the mesh, and its translated views, computed
//! lazily and at most once each however many clients share a view.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::watch;

use crate::model::Mesh;
use crate::translate::{Resources, View, translate};

/// One version of the mesh and the views made from it so far.
#[derive(Debug)]
pub struct Snapshot {
    mesh: Arc<Mesh>,
    generation: u64,
    created: Instant,
    views: Mutex<HashMap<View, Arc<Resources>>>,
}

impl Snapshot {
    /// A snapshot of `mesh`; `generation` counts mesh changes.
    pub fn new(mesh: Arc<Mesh>, generation: u64) -> Snapshot {
        Snapshot {
            mesh,
            generation,
            created: Instant::now(),
            views: Mutex::new(HashMap::new()),
        }
    }

    /// The mesh.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// How many mesh changes came before this one.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When the mesh change that made this snapshot was seen.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// The resources of `view`, translated on first use. Streams of the same
    /// view wait for the first translation instead of repeating it.
    pub fn view(&self, view: &View) -> Arc<Resources> {
        // A panic while translating leaves no partial entry behind, so a
        // poisoned map is still consistent.
        let mut views = self.views.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(resources) = views.get(view) {
            return resources.clone();
        }
        let resources = Arc::new(translate(&self.mesh, view));
        views.insert(view.clone(), resources.clone());
        resources
    }

    /// How many distinct views were translated.
    pub fn views_translated(&self) -> usize {
        self.views
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Turns every published mesh into a snapshot, until the mesh sender is
/// dropped.
pub fn snapshots(mut meshes: watch::Receiver<Arc<Mesh>>) -> watch::Receiver<Arc<Snapshot>> {
    let first = Arc::new(Snapshot::new(meshes.borrow_and_update().clone(), 0));
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut generation = 0;
        while meshes.changed().await.is_ok() {
            generation += 1;
            let mesh = meshes.borrow_and_update().clone();
            if tx.send(Arc::new(Snapshot::new(mesh, generation))).is_err() {
                break;
            }
        }
    });
    rx
}
