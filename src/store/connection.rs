//! One connection type for a standalone Redis and a Redis Cluster.
//!
//! Both variants multiplex concurrent commands over shared sockets (pipelining), reconnect on
//! their own, and connect lazily, so a Redis that is down at start-up only degrades decisions.
//! In a cluster every command of a decision names keys of one org, which share a hash slot, so
//! each `EVALSHA` is routed to exactly one primary; `SCRIPT LOAD` goes to all of them.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

#[derive(Clone)]
pub enum Conn {
    Standalone(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

pub struct LazyCluster {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

impl Conn {
    pub fn standalone(
        client: redis::Client,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        Ok(Conn::Standalone(ConnectionManager::new_lazy_with_config(
            client, config,
        )?))
    }

    /// `seeds`: some (or all) of the cluster's nodes; the rest is discovered.
    pub fn cluster(
        seeds: &[String],
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let client = ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(2)
            .build()?;
        Ok(Conn::Cluster(Arc::new(LazyCluster {
            client,
            conn: OnceCell::new(),
        })))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(lazy) => Box::pin(async move {
                let mut c = lazy.get().await?;
                c.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(lazy) => Box::pin(async move {
                let mut c = lazy.get().await?;
                c.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}
