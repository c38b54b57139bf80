//! The generated clients and servers work over a real tonic server on 127.0.0.1:0, one test per
//! service: unary calls, server streams, and the leader hint a follower attaches to
//! `UNAVAILABLE`. The behaviour behind the services is tested in `ha-monitor`; these servers
//! only echo what the contract carries.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::pin::Pin;

use ha_proto::v1::agent_service_client::AgentServiceClient;
use ha_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use ha_proto::v1::operator_service_client::OperatorServiceClient;
use ha_proto::v1::operator_service_server::{OperatorService, OperatorServiceServer};
use ha_proto::v1::peer_service_client::PeerServiceClient;
use ha_proto::v1::peer_service_server::{PeerService, PeerServiceServer};
use ha_proto::v1::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Serves `router` on an ephemeral loopback port until the returned sender is dropped.
async fn serve(router: tonic::transport::server::Router) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
    });
    (addr, stop_tx)
}

struct Agents;

#[tonic::async_trait]
impl AgentService for Agents {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = req.into_inner();
        if req.token.is_empty() {
            return Err(Status::unauthenticated("join token required"));
        }
        Ok(Response::new(JoinResponse {
            certificate_pem: format!("cert for {}", req.node),
            ca_pem: "ca".into(),
            monitors: vec![MonitorMember {
                id: 1,
                address: "127.0.0.1:7400".into(),
            }],
        }))
    }

    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let observed = req
            .into_inner()
            .observed
            .ok_or_else(|| Status::invalid_argument("observed is required"))?;
        let lsn = match observed.detail {
            Some(observed_state::Detail::Postgres(pg)) => pg.flush_lsn,
            _ => 0,
        };
        Ok(Response::new(ReportResponse {
            goal: Some(Goal {
                node: observed.node,
                state: GoalState::Primary.into(),
                epoch: observed.epoch + 1,
                synchronous_quorum: u32::try_from(lsn % 7).unwrap(),
                ..Default::default()
            }),
            lease_ms: 3000,
            report_interval_ms: 500,
        }))
    }

    type WatchGoalStream = BoxStream<Goal>;

    async fn watch_goal(
        &self,
        req: Request<WatchGoalRequest>,
    ) -> Result<Response<Self::WatchGoalStream>, Status> {
        let node = req.into_inner().node;
        let goals = (1..=3).map(move |epoch| {
            Ok(Goal {
                node: node.clone(),
                state: GoalState::Standby.into(),
                epoch,
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(goals))))
    }

    async fn renew(&self, _: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

#[tokio::test]
async fn agent_service_unary_and_stream() {
    let (addr, _stop) = serve(Server::builder().add_service(AgentServiceServer::new(Agents))).await;
    let mut client = AgentServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let report = client
        .report(ReportRequest {
            observed: Some(ObservedState {
                node: "psql1".into(),
                kind: NodeKind::Postgres.into(),
                epoch: 4,
                detail: Some(observed_state::Detail::Postgres(PostgresObservation {
                    flush_lsn: 10,
                    ..Default::default()
                })),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let goal = report.goal.unwrap();
    assert_eq!(
        (goal.node.as_str(), goal.epoch, goal.synchronous_quorum),
        ("psql1", 5, 3)
    );
    assert_eq!(report.lease_ms, 3000);

    let missing = client
        .report(ReportRequest { observed: None })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);

    let joined = client
        .join(JoinRequest {
            token: "hajt_x_y".into(),
            node: "psql2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.certificate_pem, "cert for psql2");

    let epochs: Vec<u64> = client
        .watch_goal(WatchGoalRequest {
            node: "psql2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .map(|g| g.unwrap().epoch)
        .collect()
        .await;
    assert_eq!(epochs, vec![1, 2, 3]);
}

/// An operator service on a follower: every call is refused with the leader hint, except
/// `Status`, which a follower may answer as stale, and `FollowEvents`, which streams.
struct Follower;

fn not_leader() -> Status {
    let mut status = Status::unavailable("not the leader");
    let md = status.metadata_mut();
    md.insert(
        ha_proto::LEADER_ADDR_METADATA,
        "127.0.0.1:7402".parse().unwrap(),
    );
    md.insert(ha_proto::LEADER_ID_METADATA, "2".parse().unwrap());
    status
}

#[tonic::async_trait]
impl OperatorService for Follower {
    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        if req.into_inner().linearizable {
            return Err(not_leader());
        }
        Ok(Response::new(StatusResponse {
            stale: true,
            answered_by: 3,
            monitors: vec![MonitorStatus {
                id: 3,
                address: "127.0.0.1:7403".into(),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    type FollowEventsStream = BoxStream<Event>;

    async fn follow_events(
        &self,
        req: Request<EventsRequest>,
    ) -> Result<Response<Self::FollowEventsStream>, Status> {
        let after = req.into_inner().after_seq;
        let events = (after + 1..=after + 2).map(|seq| {
            Ok(Event {
                seq,
                kind: "test".into(),
                message: format!("event {seq}"),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn events(&self, _: Request<EventsRequest>) -> Result<Response<EventsResponse>, Status> {
        Err(not_leader())
    }

    async fn switchover(
        &self,
        _: Request<SwitchoverRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }

    async fn failover(
        &self,
        _: Request<FailoverRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }

    async fn set_maintenance(
        &self,
        _: Request<SetMaintenanceRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }

    async fn set_node_settings(
        &self,
        _: Request<SetNodeSettingsRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }

    async fn set_group_settings(
        &self,
        _: Request<SetGroupSettingsRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }

    async fn remove_node(
        &self,
        _: Request<RemoveNodeRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }

    async fn create_join_token(
        &self,
        _: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        Err(not_leader())
    }

    async fn revoke_join_token(
        &self,
        _: Request<RevokeJoinTokenRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }

    async fn revoke_certificate(
        &self,
        _: Request<RevokeCertificateRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }

    async fn add_monitor(
        &self,
        _: Request<AddMonitorRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        Err(not_leader())
    }

    async fn remove_monitor(
        &self,
        _: Request<RemoveMonitorRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        Err(not_leader())
    }

    async fn start_drill(
        &self,
        _: Request<StartDrillRequest>,
    ) -> Result<Response<OperationResponse>, Status> {
        Err(not_leader())
    }
}

#[tokio::test]
async fn operator_service_leader_hint_and_event_stream() {
    let (addr, _stop) =
        serve(Server::builder().add_service(OperatorServiceServer::new(Follower))).await;
    let mut client = OperatorServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let stale = client
        .status(StatusRequest {
            linearizable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stale.stale);
    assert_eq!(stale.monitors[0].id, 3);

    let refused = client
        .failover(FailoverRequest {
            request_id: "r1".into(),
            group: "main".into(),
            allow_data_loss: true,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let hint = refused
        .metadata()
        .get(ha_proto::LEADER_ADDR_METADATA)
        .unwrap();
    assert_eq!(hint.to_str().unwrap(), "127.0.0.1:7402");
    let id = refused
        .metadata()
        .get(ha_proto::LEADER_ID_METADATA)
        .unwrap();
    assert_eq!(id.to_str().unwrap(), "2");

    let seqs: Vec<u64> = client
        .follow_events(EventsRequest {
            after_seq: 40,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .map(|e| e.unwrap().seq)
        .collect()
        .await;
    assert_eq!(seqs, vec![41, 42]);
}

struct Peers;

#[tonic::async_trait]
impl PeerService for Peers {
    async fn raft(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let batch = req.into_inner();
        if batch.from == 0 {
            return Err(Status::invalid_argument("raft id 0 is reserved"));
        }
        if batch.messages.iter().any(Vec::is_empty) {
            return Err(Status::invalid_argument("empty raft message"));
        }
        Ok(Response::new(RaftAck {}))
    }
}

#[tokio::test]
async fn peer_service_carries_opaque_raft_bytes() {
    let (addr, _stop) = serve(Server::builder().add_service(PeerServiceServer::new(Peers))).await;
    let mut client = PeerServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let big = vec![0xAB; 1 << 20];
    client
        .raft(RaftBatch {
            from: 1,
            messages: vec![vec![1, 2, 3], big],
        })
        .await
        .unwrap();
    let err = client
        .raft(RaftBatch {
            from: 0,
            messages: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
