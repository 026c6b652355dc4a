//! Sources fill the mesh model: the YAML file on one machine, Kubernetes in
//! a cluster. Each one parses its input into a [`Mesh`] (refusing bad input
//! whole) and hands it to a [`Publisher`]; the rest of the control plane
//! only ever sees validated models.

pub mod file;

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::Mesh;

/// Where sources send new models, and where refused updates are recorded.
///
/// The last published model keeps serving until a valid one replaces it.
#[derive(Clone)]
pub struct Publisher {
    tx: Arc<watch::Sender<Arc<Mesh>>>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// A publisher that starts with `initial` and a receiver for it.
    pub fn new(initial: Mesh, metrics: Arc<Metrics>) -> (Publisher, watch::Receiver<Arc<Mesh>>) {
        let (tx, rx) = watch::channel(Arc::new(initial));
        metrics.record_mesh(rx.borrow().as_ref());
        (
            Publisher {
                tx: Arc::new(tx),
                metrics,
            },
            rx,
        )
    }

    /// Replaces the served model. A model equal to the current one is not
    /// re-published, so clients see no version change for a no-op edit.
    pub fn publish(&self, source: &str, mesh: Mesh) {
        self.metrics
            .config_reloads
            .with_label_values(&[source])
            .inc();
        let changed = self.tx.send_if_modified(|current| {
            if **current == mesh {
                false
            } else {
                *current = Arc::new(mesh);
                true
            }
        });
        if changed {
            self.metrics.record_mesh(self.tx.borrow().as_ref());
            tracing::info!(source, "mesh updated");
        } else {
            tracing::debug!(source, "mesh unchanged");
        }
    }

    /// Records a refused update; the last good model keeps serving.
    pub fn reject(&self, source: &str, error: &dyn fmt::Display) {
        self.metrics
            .config_reload_failures
            .with_label_values(&[source])
            .inc();
        tracing::error!(
            source,
            "refused mesh update, still serving the last good one:\n{error}"
        );
    }

    /// A receiver of the served model.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Mesh>> {
        self.tx.subscribe()
    }
}
