//! The leader lease of orchestrators sharing one database: one of them
//! holds it and schedules; the others wait to take it over once it has not
//! been renewed for its time to live. Taking it over moves its term on, and
//! from then on every write of the older term is refused (the fence, see
//! `pool::Session::transaction`), so an orchestrator that was cut off and
//! comes back cannot write over what its successor did. Times are the
//! database's (`now()`): the orchestrators' clocks do not matter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_server::CancellationToken;

use super::PostgresStore;
use super::pool::{PgResult, Session};
use crate::store::StoreResult;

/// Who holds the lease now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub holder: String,
    pub term: i64,
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// Takes the lease when nobody holds it or its holder let it expire.
fn try_take(db: &mut Session, holder: &str, ttl: Duration) -> PgResult<Option<i64>> {
    let row = db.unfenced().query_opt(
        "INSERT INTO leader_lease (id, holder, term, expires_at) \
         VALUES (1, $1, 1, now() + $2::bigint * interval '1 millisecond') \
         ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, term = leader_lease.term + 1, \
             expires_at = EXCLUDED.expires_at \
         WHERE leader_lease.expires_at < now() \
         RETURNING term",
        &[&holder, &ttl_ms(ttl)],
    )?;
    Ok(row.map(|row| row.get(0)))
}

/// Extends the lease of `term`; false when another took it over.
fn renew(db: &mut Session, term: i64, ttl: Duration) -> PgResult<bool> {
    let renewed = db.unfenced().execute(
        "UPDATE leader_lease SET expires_at = now() + $2::bigint * interval '1 millisecond' \
         WHERE id = 1 AND term = $1",
        &[&term, &ttl_ms(ttl)],
    )?;
    Ok(renewed == 1)
}

impl PostgresStore {
    /// Takes the leader lease for `ttl` if it is free or expired; the term
    /// it leads under, and from then on every write is fenced by it.
    pub fn try_lead(&self, holder: &str, ttl: Duration) -> StoreResult<Option<i64>> {
        let holder = holder.to_string();
        let term = self.pool.call(move |db| try_take(db, &holder, ttl))?;
        if let Some(term) = term {
            self.pool.fence_at(term);
        }
        Ok(term)
    }

    /// Extends the lease this orchestrator leads under; false when another
    /// took it over (the store's writes are refused from then on).
    pub fn renew_lead(&self, ttl: Duration) -> StoreResult<bool> {
        let term = self.pool.fenced_term();
        self.pool.call(move |db| renew(db, term, ttl))
    }

    /// Gives the lease up at once (on a clean stop), so that another
    /// orchestrator need not wait for it to expire.
    pub fn resign(&self) -> StoreResult<()> {
        let term = self.pool.fenced_term();
        self.pool.call(move |db| {
            db.unfenced().execute(
                "UPDATE leader_lease SET expires_at = now() - interval '1 second' \
                 WHERE id = 1 AND term = $1",
                &[&term],
            )?;
            Ok(())
        })
    }

    /// Who holds the lease, if anyone ever did.
    pub fn lease_holder(&self) -> StoreResult<Option<LeaseHolder>> {
        self.pool.call(|db| {
            let row = db
                .unfenced()
                .query_opt("SELECT holder, term FROM leader_lease WHERE id = 1", &[])?;
            Ok(row.map(|row| LeaseHolder {
                holder: row.get(0),
                term: row.get(1),
            }))
        })
    }
}

impl PostgresStore {
    /// Waits, asking again every tenth of `ttl`, until this orchestrator
    /// holds the lease (at once when nobody does); the term it leads under.
    pub async fn wait_to_lead(&self, holder: &str, ttl: Duration) -> i64 {
        let mut followed = None;
        loop {
            match self.try_lead(holder, ttl) {
                Ok(Some(term)) => {
                    tracing::info!(term, "leading: this orchestrator holds the leader lease");
                    return term;
                }
                Ok(None) => {
                    let leader = self.lease_holder().ok().flatten();
                    if leader != followed {
                        if let Some(leader) = &leader {
                            tracing::info!(
                                leader = %leader.holder,
                                term = leader.term,
                                "following: another orchestrator holds the leader lease; \
                                 taking over if it is not renewed for {}",
                                humantime::format_duration(ttl)
                            );
                        }
                        followed = leader;
                    }
                }
                Err(error) => tracing::warn!(%error, "could not ask for the leader lease"),
            }
            tokio::time::sleep(ttl / 10).await;
        }
    }

    /// Renews the lease every third of `ttl` until `shutdown` (then gives
    /// it up). When it was taken over, or could not be renewed for a whole
    /// `ttl` (another may hold it by now), cancels `shutdown`: this
    /// orchestrator stops, and started again it follows.
    pub fn keep_leading(self: Arc<Self>, ttl: Duration, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut renewed_at = Instant::now();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => {
                        if let Err(error) = self.resign() {
                            tracing::warn!(%error, "could not give the leader lease up");
                        }
                        return;
                    }
                    () = tokio::time::sleep(ttl / 3) => {}
                }
                match self.renew_lead(ttl) {
                    Ok(true) => renewed_at = Instant::now(),
                    Ok(false) => {
                        tracing::error!(
                            "the leader lease was taken over by another orchestrator: stopping"
                        );
                        shutdown.cancel();
                        return;
                    }
                    Err(error) if renewed_at.elapsed() >= ttl => {
                        tracing::error!(%error, "the leader lease could not be renewed for {}: stopping", humantime::format_duration(ttl));
                        shutdown.cancel();
                        return;
                    }
                    Err(error) => tracing::warn!(%error, "could not renew the leader lease"),
                }
            }
        });
    }
}
