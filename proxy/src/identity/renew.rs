//! Keeps the workload's certificate fresh.
//!
//! [`Renewer::obtain`] gets the first certificate, retrying with capped,
//! jittered backoff while the control plane is unreachable;
//! [`Renewer::run`] then sleeps until the renewal time (half the lifetime,
//! jittered), asks for a new certificate with a fresh key and swaps it into
//! the [`CredentialResolver`]. A failed renewal keeps the current
//! credentials and is retried with backoff; once they have expired every
//! failure is logged as an error. [`start`] does both and publishes the
//! resolver on a `watch` channel: `Some` means "credentials available".

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use super::client::{CertificateClient, ClientError, TokenSource};
use super::{Credentials, SpiffeId, WorkloadKey};
use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::tls::CredentialResolver;

/// First retry delay (before jitter).
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Renewal happens at `0.5 ± DEFAULT_JITTER` of the lifetime.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Longest single sleep, so wall-clock jumps are noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// The shortest retry delay the time left before expiry can impose.
const MIN_RETRY_BEFORE_EXPIRY: Duration = Duration::from_secs(1);

/// How the renewal loop behaves.
#[derive(Debug, Clone)]
pub struct RenewConfig {
    /// The identity to ask for.
    pub id: SpiffeId,
    /// Where the bearer token comes from (read for every request).
    pub token: TokenSource,
    /// First retry delay (before jitter).
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Renewal at `0.5 ± jitter` of the lifetime; clamped to `0..=0.4`.
    pub jitter: f64,
}

impl RenewConfig {
    /// Defaults for `id` and `token`.
    pub fn new(id: SpiffeId, token: TokenSource) -> Self {
        Self {
            id,
            token,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            jitter: DEFAULT_JITTER,
        }
    }
}

/// "Credentials available": `None` until the first certificate, then the
/// resolver every handshake reads. Notified again at every renewal.
pub type Ready = watch::Receiver<Option<Arc<CredentialResolver>>>;

/// Gets the first certificate, then keeps renewing, publishing on the
/// returned channel. Stops when the task is aborted.
pub fn start(
    client: CertificateClient,
    config: RenewConfig,
    metrics: Arc<Metrics>,
) -> (Ready, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut renewer = Renewer::new(client, config, metrics);
        let first = renewer.obtain().await;
        let resolver = Arc::new(CredentialResolver::new(first));
        tx.send_replace(Some(Arc::clone(&resolver)));
        renewer.run(resolver, &tx).await;
    });
    (rx, task)
}

/// The renewal loop's state.
#[derive(Debug)]
pub struct Renewer {
    client: CertificateClient,
    config: RenewConfig,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    rng: fastrand::Rng,
}

impl Renewer {
    /// A renewer asking `client` for `config.id`.
    pub fn new(client: CertificateClient, config: RenewConfig, metrics: Arc<Metrics>) -> Self {
        let backoff = Backoff::new(
            config.backoff_initial,
            config.backoff_max,
            fastrand::Rng::new(),
        );
        Self {
            client,
            config,
            metrics,
            backoff,
            rng: fastrand::Rng::new(),
        }
    }

    /// The first credentials: retries until the CA answers.
    pub async fn obtain(&mut self) -> Credentials {
        let mut failures: u64 = 0;
        loop {
            match self.fetch().await {
                Ok(credentials) => {
                    tracing::info!(
                        spiffe_id = %self.config.id,
                        expires_at = %credentials.expires_at(),
                        renew_at = %credentials.renew_at(),
                        "obtained the workload certificate"
                    );
                    return credentials;
                }
                Err(error) => {
                    failures += 1;
                    let delay = self.backoff.next_delay();
                    if failures == 1 || failures.is_multiple_of(12) {
                        tracing::warn!(
                            spiffe_id = %self.config.id,
                            ca = self.client.addr(),
                            %error,
                            attempts = failures,
                            retry_in = ?delay,
                            "cannot get the workload certificate yet"
                        );
                    } else {
                        tracing::debug!(%error, "cannot get the workload certificate yet");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Renews forever: sleeps until the current credentials' renewal time,
    /// renews (with backoff on failure), stores the new credentials in
    /// `resolver` and notifies `ready`.
    pub async fn run(
        &mut self,
        resolver: Arc<CredentialResolver>,
        ready: &watch::Sender<Option<Arc<CredentialResolver>>>,
    ) {
        loop {
            let current = resolver.current();
            sleep_until(current.renew_at()).await;
            loop {
                match self.fetch().await {
                    Ok(credentials) => {
                        tracing::info!(
                            spiffe_id = %self.config.id,
                            expires_at = %credentials.expires_at(),
                            renew_at = %credentials.renew_at(),
                            "renewed the workload certificate"
                        );
                        resolver.store(credentials);
                        ready.send_modify(|_| {});
                        break;
                    }
                    Err(error) => {
                        let delay = self.backoff.next_delay();
                        let now = OffsetDateTime::now_utc();
                        let expires_at = current.expires_at();
                        if now >= expires_at {
                            tracing::error!(
                                spiffe_id = %self.config.id,
                                %expires_at,
                                %error,
                                retry_in = ?delay,
                                "the workload certificate has EXPIRED and cannot be renewed; \
                                 peers will refuse it"
                            );
                            tokio::time::sleep(delay).await;
                        } else {
                            // However long the backoff has grown, retry at
                            // least four times in the time left, so a short
                            // certificate is renewed soon after the control
                            // plane returns (and wake at expiry to say so).
                            let left = duration_until(expires_at);
                            let delay = delay.min((left / 4).max(MIN_RETRY_BEFORE_EXPIRY));
                            tracing::warn!(
                                spiffe_id = %self.config.id,
                                %expires_at,
                                %error,
                                retry_in = ?delay,
                                "cannot renew the workload certificate; keeping the current one"
                            );
                            tokio::time::sleep(delay.min(left)).await;
                        }
                    }
                }
            }
        }
    }

    /// One signing request with a fresh key; counts the outcome, updates
    /// the expiry gauge and the client certificate presented next time.
    async fn fetch(&mut self) -> Result<Credentials, ClientError> {
        let result = self.try_fetch().await;
        match &result {
            Ok(credentials) => {
                self.backoff.reset();
                self.metrics.certificate_renewals.inc();
                self.metrics
                    .certificate_expiry
                    .set_expires_at(credentials.expires_at());
                self.client.present(credentials);
            }
            Err(error) => {
                self.metrics
                    .certificate_renewal_failures
                    .with_label_values(&[error.reason()])
                    .inc();
            }
        }
        result
    }

    async fn try_fetch(&mut self) -> Result<Credentials, ClientError> {
        let token = self.config.token.read()?;
        let key = WorkloadKey::generate()?;
        let asked_at = OffsetDateTime::now_utc();
        let credentials = self.client.sign(&key, &self.config.id, &token).await?;
        let renew_at = self.renew_time(&credentials, asked_at);
        Ok(credentials.with_renew_at(renew_at))
    }

    /// `0.5 ± jitter` of the lifetime counted from when we asked (the CA
    /// backdates `notBefore` for clock skew, which would otherwise make
    /// short-lived certificates due for renewal at once).
    fn renew_time(
        &mut self,
        credentials: &Credentials,
        asked_at: OffsetDateTime,
    ) -> OffsetDateTime {
        let start = credentials.not_before().max(asked_at);
        let lifetime = credentials.expires_at() - start;
        let jitter = self.config.jitter.clamp(0.0, 0.4);
        let fraction = 0.5 + jitter * (self.rng.f64() * 2.0 - 1.0);
        start + lifetime * fraction
    }
}

/// Sleeps until the wall-clock time `at`, in steps of at most a minute.
async fn sleep_until(at: OffsetDateTime) {
    loop {
        let left = duration_until(at);
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(MAX_SLEEP)).await;
    }
}

fn duration_until(at: OffsetDateTime) -> Duration {
    Duration::try_from(at - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO)
}
