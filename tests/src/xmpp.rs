//! A real XMPP client for the tests: one logged-in user of an ejabberd node, on the `tokio-xmpp`
//! library (plaintext c2s on loopback or inside a test's network namespace, SASL as the server
//! offers it, resource binding, initial presence so that the server routes chat messages and
//! delivers stored offline messages). Besides chat and ping it writes and reads private XML
//! storage (XEP-0049): with ejabberd's SQL backend, an acknowledged `set` is a row committed
//! in PostgreSQL, so a client can count its acknowledged writes through ejabberd and check
//! later that none is missing.
//!
//! Invariant: every event of the session passes through [`XmppUser::pump`], which keeps the
//! chat messages received in an inbox and counts every interruption of the session after the
//! first login (a stream end, or a new session): a test asserts "the session stayed up" on that
//! count and on the bound JID, which a new session would change.

use std::collections::VecDeque;
use std::str::FromStr as _;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::time::Instant;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::message::{Lang, Message, MessageType};
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event, IqRequest, IqResponse, Stanza};

/// XEP-0049's namespace.
const PRIVATE: &str = "jabber:iq:private";

/// One logged-in XMPP user.
#[derive(Debug)]
pub struct XmppUser {
    client: Client,
    bound: Jid,
    /// Chat messages received and not yet taken: (sender's bare JID, body).
    inbox: VecDeque<(String, String)>,
    interruptions: u32,
}

impl XmppUser {
    /// Logs `jid` in with `password` at `127.0.0.1:port` and announces presence, within
    /// `timeout`.
    pub async fn login(
        jid: &str,
        password: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Self, String> {
        Self::login_at(jid, password, &format!("127.0.0.1:{port}"), timeout).await
    }

    /// Logs `jid` in with `password` at `address` (`ip:port`) and announces presence, within
    /// `timeout`.
    pub async fn login_at(
        jid: &str,
        password: &str,
        address: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let bare = BareJid::from_str(jid).map_err(|e| format!("{jid}: {e}"))?;
        let mut client = Client::new_plaintext(
            bare,
            password.to_owned(),
            DnsConfig::addr(address),
            Timeouts::default(),
        );
        let deadline = Instant::now() + timeout;
        let bound = loop {
            match tokio::time::timeout_at(deadline, client.next()).await {
                Err(_) => return Err(format!("{jid}: not online within {timeout:?}")),
                Ok(None) => return Err(format!("{jid}: the client ended before it was online")),
                Ok(Some(Event::Online { bound_jid, .. })) => break bound_jid,
                Ok(Some(Event::Disconnected(e))) => {
                    return Err(format!("{jid}: login failed: {e}"));
                }
                Ok(Some(Event::Stanza(_))) => {}
            }
        };
        client
            .send_stanza(Presence::new(PresenceType::None).into())
            .await
            .map_err(|e| format!("{jid}: sending presence: {e}"))?;
        Ok(Self {
            client,
            bound,
            inbox: VecDeque::new(),
            interruptions: 0,
        })
    }

    /// The full JID the server bound for this session.
    pub fn bound_jid(&self) -> String {
        self.bound.to_string()
    }

    /// Stream ends and new sessions seen since the login, once the events already received
    /// are handled.
    pub async fn interruptions(&mut self) -> u32 {
        while self.pump(Instant::now()).await {}
        self.interruptions
    }

    /// Sends a chat message with `body` to the bare JID `to`.
    pub async fn send(&mut self, to: &str, body: &str) -> Result<(), String> {
        let to = Jid::from_str(to).map_err(|e| format!("{to}: {e}"))?;
        let mut message = Message::new(Some(to));
        message.type_ = MessageType::Chat;
        message.bodies.insert(Lang::default(), body.to_owned());
        self.client
            .send_stanza(message.into())
            .await
            .map(|_| ())
            .map_err(|e| format!("{}: sending: {e}", self.bound))
    }

    /// An XMPP ping (XEP-0199) of the server, answered within `timeout`: the session works.
    pub async fn ping(&mut self, timeout: Duration) -> Result<(), String> {
        let server = Jid::from_str(self.bound.domain().as_str()).map_err(|e| e.to_string())?;
        self.iq("ping", Some(server), IqRequest::Get(Ping.into()), timeout)
            .await
            .map(|_| ())
    }

    /// Stores `value` under `key` (an XML namespace, one row per key) in the account's private
    /// XML storage; `Ok` once the server acknowledged it, within `timeout`.
    pub async fn store_private(
        &mut self,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let item = Element::builder("item", key).append(value).build();
        let query = Element::builder("query", PRIVATE).append(item).build();
        self.iq("private set", None, IqRequest::Set(query), timeout)
            .await
            .map(|_| ())
    }

    /// The value stored under `key` in the account's private XML storage (`None`: nothing
    /// stored), within `timeout`.
    pub async fn load_private(
        &mut self,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<String>, String> {
        let query = Element::builder("query", PRIVATE)
            .append(Element::builder("item", key).build())
            .build();
        let answer = self
            .iq("private get", None, IqRequest::Get(query), timeout)
            .await?;
        let text = answer
            .as_ref()
            .and_then(|q| q.get_child("item", key))
            .map(Element::text)
            .filter(|t| !t.is_empty());
        Ok(text)
    }

    /// Sends an IQ request and waits for its answer (the result's payload) within `timeout`,
    /// handling the session's other events meanwhile.
    async fn iq(
        &mut self,
        what: &str,
        to: Option<Jid>,
        request: IqRequest,
        timeout: Duration,
    ) -> Result<Option<Element>, String> {
        let token = self.client.send_iq(to, request).await;
        let mut token = std::pin::pin!(token);
        let deadline = Instant::now() + timeout;
        loop {
            tokio::select! {
                answer = &mut token => return match answer {
                    Ok(IqResponse::Result(payload)) => Ok(payload),
                    Ok(IqResponse::Error(e)) => Err(format!("{}: {what} refused: {e:?}", self.bound)),
                    Err(e) => Err(format!("{}: {what} failed: {e:?}", self.bound)),
                },
                // Other events go on arriving meanwhile.
                more = self.pump(deadline) => if !more {
                    return Err(format!("{}: no {what} answer within {timeout:?}", self.bound));
                },
            }
        }
    }

    /// Waits for a chat message with `body` and returns its sender's bare JID.
    pub async fn receive(&mut self, body: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.inbox.iter().position(|(_, b)| b == body) {
                let (from, _) = self.inbox.remove(i).unwrap_or_default();
                return Ok(from);
            }
            if !self.pump(deadline).await {
                return Err(format!(
                    "{}: no message {body:?} within {timeout:?} (inbox: {:?})",
                    self.bound, self.inbox
                ));
            }
        }
    }

    /// Handles the session's events until `deadline`: the next one, or none (false).
    async fn pump(&mut self, deadline: Instant) -> bool {
        match tokio::time::timeout_at(deadline, self.client.next()).await {
            Err(_) => false,
            Ok(None) => {
                self.interruptions += 1;
                false
            }
            Ok(Some(Event::Online { bound_jid, .. })) => {
                self.interruptions += 1;
                self.bound = bound_jid;
                true
            }
            Ok(Some(Event::Disconnected(_))) => {
                self.interruptions += 1;
                true
            }
            Ok(Some(Event::Stanza(Stanza::Message(m)))) => {
                if let (Some(from), Some(body)) = (&m.from, m.bodies.values().next()) {
                    self.inbox
                        .push_back((from.to_bare().to_string(), body.clone()));
                }
                true
            }
            Ok(Some(Event::Stanza(_))) => true,
        }
    }

    /// Ends the session (the server then stores messages to this user as offline messages).
    pub async fn logout(self) {
        let _ = self.client.send_end().await;
    }
}

/// A running `ha-xmpp-load` against the reference stand's two frontends (`192.168.1.2` and
/// `.3`, port 5222, domain `domain.local`) with the stand's load accounts; killed on drop if
/// the test fails before [`LoadRun::finish`].
#[derive(Debug)]
pub struct LoadRun(Option<std::process::Child>);

impl LoadRun {
    /// Runs `command` (which ends with the `ha-xmpp-load` program, for example behind
    /// `ha-provision exec e1server --`, which execs in place) with the stand's arguments, and
    /// returns once every user is writing.
    pub fn start(mut command: std::process::Command, password_file: &std::path::Path) -> Self {
        use std::io::BufRead as _;
        let mut child = command
            .args([
                "--server",
                "192.168.1.2:5222",
                "--server",
                "192.168.1.3:5222",
            ])
            .args(["--domain", "domain.local", "--duration", "24h", "--json"])
            .arg("--password-file")
            .arg(password_file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting ha-xmpp-load");
        let mut line = String::new();
        let stderr = child.stderr.take().expect("stderr is piped");
        // Blocks until the users are writing; EOF (it failed) fails the assertion.
        let _ = std::io::BufReader::new(stderr).read_line(&mut line);
        let load = Self(Some(child));
        assert_eq!(
            line.trim(),
            "ha-xmpp-load: writing",
            "the XMPP load did not start"
        );
        load
    }

    /// Stops the load (SIGTERM: each user writes once more and reads everything back) and
    /// returns its JSON report (`{"error": ...}` when it printed none).
    pub fn finish(mut self) -> serde_json::Value {
        let Some(child) = self.0.take() else {
            return serde_json::json!({ "error": "already finished" });
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match child.wait_with_output() {
            Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                serde_json::json!({
                    "error": format!("no report ({e}): {}", String::from_utf8_lossy(&out.stdout))
                })
            }),
            Err(e) => serde_json::json!({ "error": format!("waiting for ha-xmpp-load: {e}") }),
        }
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
