//! A snapshot: one version of the mesh, and its translated views, computed
//! lazily and at most once each however many clients share a view.
//!
//! A view is the part of its flavor that every view shares (clusters,
//! endpoints, routes, the unbound listeners: translated once per flavor)
//! plus the few resources of its own (the listeners bound where the node
//! asks, its application's cluster). So a thousand sidecars, each with its
//! own inbound listener, cost one full translation and a thousand small
//! ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use tokio::sync::watch;

use crate::model::Mesh;
use crate::translate::{Flavor, Resources, Shared, View, translate_shared, translate_view};

/// One version of the mesh and the views made from it so far.
#[derive(Debug)]
pub struct Snapshot {
    mesh: Arc<Mesh>,
    generation: u64,
    created: Instant,
    sidecar: OnceLock<Shared>,
    proxyless_grpc: OnceLock<Shared>,
    views: Mutex<HashMap<View, Arc<Resources>>>,
}

impl Snapshot {
    /// A snapshot of `mesh`; `generation` counts mesh changes.
    pub fn new(mesh: Arc<Mesh>, generation: u64) -> Snapshot {
        Snapshot {
            mesh,
            generation,
            created: Instant::now(),
            sidecar: OnceLock::new(),
            proxyless_grpc: OnceLock::new(),
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

    /// What every view of `flavor` shares, translated on first use.
    /// Callers that arrive during that translation wait for it.
    pub fn shared(&self, flavor: Flavor) -> &Shared {
        let cell = match flavor {
            Flavor::Sidecar => &self.sidecar,
            Flavor::ProxylessGrpc => &self.proxyless_grpc,
        };
        cell.get_or_init(|| translate_shared(&self.mesh, flavor))
    }

    /// The resources of `view`, translated on first use. The map is locked
    /// only to look up and to insert: two streams that race on a new view
    /// may both translate its small part, and one result is kept.
    pub fn view(&self, view: &View) -> Arc<Resources> {
        if let Some(resources) = self.lock_views().get(view) {
            return resources.clone();
        }
        let resources = Arc::new(translate_view(&self.mesh, self.shared(view.flavor), view));
        self.lock_views()
            .entry(view.clone())
            .or_insert(resources)
            .clone()
    }

    /// How many distinct views were translated.
    pub fn views_translated(&self) -> usize {
        self.lock_views().len()
    }

    fn lock_views(&self) -> std::sync::MutexGuard<'_, HashMap<View, Arc<Resources>>> {
        // Nothing is translated under the lock, so a poisoned map is still
        // consistent.
        self.views.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Turns every published mesh into a snapshot, until the mesh sender is
/// dropped. What sidecars share is translated before a snapshot is
/// published, on a blocking thread, so streams never wait for it on the
/// async workers.
pub fn snapshots(mut meshes: watch::Receiver<Arc<Mesh>>) -> watch::Receiver<Arc<Snapshot>> {
    let first = Arc::new(Snapshot::new(meshes.borrow_and_update().clone(), 0));
    first.shared(Flavor::Sidecar);
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut generation = 0;
        while meshes.changed().await.is_ok() {
            generation += 1;
            let snapshot = Arc::new(Snapshot::new(
                meshes.borrow_and_update().clone(),
                generation,
            ));
            let warm = snapshot.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || {
                warm.shared(Flavor::Sidecar);
            })
            .await
            {
                tracing::error!("translating mesh generation {generation} failed: {e}");
                continue;
            }
            if tx.send(snapshot).is_err() {
                break;
            }
        }
    });
    rx
}
