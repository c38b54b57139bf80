//! Two ejabberd frontends in one Erlang cluster on a fresh cluster's first primary, each driven
//! by its agent: what the XMPP failover test and the ejabberd drill example run on. Needs the
//! crate's `common` module.

use ha_agent::ejabberd::PrivateInstance;
use ha_proto::v1;
use ha_tests::cluster::Cluster;
use ha_tests::free_port;

use crate::common::{self, EjabberdAgent, applied, epoch, prepare_database};

/// The frontends' node names in the catalog.
pub const FRONTENDS: [&str; 2] = ["e1", "e2"];

/// The two ejabberd nodes (`nodes[1]` joined `nodes[0]`'s cluster), their c2s ports and agents.
pub struct Frontends {
    pub nodes: [PrivateInstance; 2],
    pub c2s: [u16; 2],
    _agents: [EjabberdAgent; 2],
}

impl Frontends {
    /// ejabberd's database on psql1, then both nodes and their agents.
    pub async fn start(cluster: &Cluster) -> Self {
        prepare_database(cluster, "psql1");
        let sql_port = cluster.node("psql1").port;
        let c2s = [free_port(), free_port()];
        let e1 = PrivateInstance::start(&common::ejabberd_yml(c2s[0], sql_port), free_port())
            .await
            .unwrap();
        let e2 = PrivateInstance::start_joined(&common::ejabberd_yml(c2s[1], sql_port), &e1)
            .await
            .unwrap();
        let agents = [
            EjabberdAgent::start(cluster, FRONTENDS[0], &e1, c2s[0]).await,
            EjabberdAgent::start(cluster, FRONTENDS[1], &e2, c2s[1]).await,
        ];
        Self {
            nodes: [e1, e2],
            c2s,
            _agents: agents,
        }
    }

    /// Stops the agents, then ejabberd (the joined node first: it uses the other's epmd).
    pub async fn stop(self) {
        let Self { nodes, _agents, .. } = self;
        drop(_agents);
        let [e1, e2] = nodes;
        e2.stop().await;
        e1.stop().await;
    }
}

/// Every frontend verified `primary` at the group's current epoch.
pub fn frontends_on(s: &v1::StatusResponse, primary: &str) -> bool {
    FRONTENDS.iter().all(|name| {
        let (node, applied_epoch, _) = applied(s, name);
        node == primary && applied_epoch == epoch(s)
    })
}
