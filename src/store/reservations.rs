//! Redis records of `/v1/reservations`: one hash per reservation in its org's slot, a sorted set
//! of what is open by expiry, and `reservation.lua`, the atomic claim that lets exactly one
//! caller (a settle, a release, or any replica's sweeper) end a reservation.

use redis::AsyncCommands;

use super::{Store, StoreError};
use crate::domain::reservation::ReservationId;

/// What `claim` found (see the statuses of `reservation.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    Unknown,
    /// This call ended it, with the ending it asked for (`Ended`) or the expiry ending.
    Won {
        charges: String,
        ending: String,
    },
    /// Ended before; `done` when its differences are already in the counters.
    Before {
        charges: String,
        ending: String,
        done: bool,
    },
    /// Open and not due (a sweep asked).
    Open,
}

/// How long a finished reservation's record stays, so a late settle or release is told what
/// became of it (409/410) rather than "unknown".
pub const KEEP_ENDED_MS: i64 = 24 * 3600 * 1000;

impl Store {
    /// Write a new reservation's record and list it as open until `expires_ms`.
    pub async fn reservation_put(
        &self,
        id: &ReservationId,
        charges: &str,
        expires_ms: i64,
    ) -> Result<(), StoreError> {
        let key = self.keys.reservation(&id.org, &id.to_string());
        let mut conn = self.conn.clone();
        let put = async {
            let _: () = redis::pipe()
                .hset_multiple(
                    &key,
                    &[("charges", charges), ("expires", &expires_ms.to_string())],
                )
                .pexpire_at(&key, expires_ms + KEEP_ENDED_MS)
                .query_async(&mut conn)
                .await?;
            let _: () = conn
                .zadd(self.keys.reservations_due(), id.to_string(), expires_ms)
                .await?;
            Ok(())
        };
        self.bounded(put).await
    }

    /// End the reservation with `ending` (or, with `None`, only if it has expired) unless it
    /// ended before; `expired` is the ending an expired one gets.
    pub async fn reservation_claim(
        &self,
        id: &ReservationId,
        now_ms: i64,
        ending: Option<&str>,
        expired: &str,
    ) -> Result<Claimed, StoreError> {
        let key = self.keys.reservation(&id.org, &id.to_string());
        let mut conn = self.conn.clone();
        let mut call = self.reservation.key(&key);
        call.arg(now_ms).arg(ending.unwrap_or("")).arg(expired);
        let (status, charges, ending, done): (i64, Option<String>, Option<String>, Option<String>) =
            self.bounded(call.invoke_async(&mut conn)).await?;
        let (charges, ending) = (charges.unwrap_or_default(), ending.unwrap_or_default());
        Ok(match status {
            0 => Claimed::Unknown,
            1 | 3 => Claimed::Won { charges, ending },
            2 => Claimed::Before {
                charges,
                ending,
                done: done.is_some_and(|d| !d.is_empty()),
            },
            4 => Claimed::Open,
            s => {
                return Err(StoreError::Protocol(format!(
                    "reservation.lua answered status {s}"
                )));
            }
        })
    }

    /// The ending's differences are in the counters: mark the record done and stop listing it.
    pub async fn reservation_done(&self, id: &ReservationId) -> Result<(), StoreError> {
        let key = self.keys.reservation(&id.org, &id.to_string());
        let mut conn = self.conn.clone();
        let done = async {
            let _: () = conn.hset(&key, "done", "1").await?;
            let _: () = conn
                .zrem(self.keys.reservations_due(), id.to_string())
                .await?;
            Ok(())
        };
        self.bounded(done).await
    }

    /// Up to `limit` ids of reservations due at `now_ms` (expired, or ended and not done).
    pub async fn reservations_due(
        &self,
        now_ms: i64,
        limit: isize,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(conn.zrangebyscore_limit(
            self.keys.reservations_due(),
            "-inf",
            now_ms,
            0,
            limit,
        ))
        .await
    }

    /// Stop listing an id (its record is gone, or it is not an id).
    pub async fn reservation_unlist(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(conn.zrem::<_, _, ()>(self.keys.reservations_due(), id))
            .await
    }
}
