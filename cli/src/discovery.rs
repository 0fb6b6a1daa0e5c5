//! Which discovery server a command uses, and what the user is told about it.
//!
//! With `--discovery URL` or `--embedded-discovery ADDR`, that. Otherwise the LAN's
//! server, found with mDNS: the chat and `listen` run for long, so they look for it and
//! serve it themselves when there is none (see [`p2p_node::discovery::LanDiscovery`]);
//! one-shot commands look for a short while and use what they find. `--no-mdns` keeps to
//! this machine: serve on [`DEFAULT_EMBEDDED_DISCOVERY`], or use the server already on
//! that port.

use std::{net::SocketAddr, time::Duration};

use p2p_node::discovery::{check_url, find_lan_server, DiscoveryStatus, LanConfig, Source};
use serde_json::{json, Value};

use crate::{Global, DEFAULT_EMBEDDED_DISCOVERY};

/// How long a one-shot command looks for the LAN's discovery server.
pub const ONE_SHOT_WAIT: Duration = Duration::from_secs(2);

/// What a command needs of discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// It runs for long (the chat, `listen`): find the LAN's server, or serve it.
    Serve,
    /// It runs once (`send`, `peers`, `register`): use a server if there is one.
    Use,
    /// Nothing unless given (`history` of a peer this node already knows).
    Nothing,
}

/// The discovery a node is built with.
#[derive(Debug)]
pub enum Choice {
    /// A server by URL.
    Url(String),
    /// A server this node runs on an address.
    Embedded(SocketAddr),
    /// The LAN's server, whichever it is.
    Lan(LanConfig),
    /// None.
    None,
}

/// Chooses the discovery for a command; one-shot commands look on the LAN first and
/// say on stderr what they found.
pub async fn choose(g: &Global, need: Need) -> Choice {
    if let Some(url) = &g.discovery {
        return Choice::Url(url.clone());
    }
    if let Some(addr) = g.embedded_discovery {
        return Choice::Embedded(addr);
    }
    let default: SocketAddr = DEFAULT_EMBEDDED_DISCOVERY
        .parse()
        .expect("constant address parses");
    match need {
        Need::Nothing => Choice::None,
        _ if g.no_mdns => this_machine(default),
        Need::Serve => Choice::Lan(LanConfig {
            listen: default,
            ..LanConfig::default()
        }),
        Need::Use => one_shot(default).await,
    }
}

/// `--no-mdns`: serve on `default`, or use the server already on its port here.
fn this_machine(default: SocketAddr) -> Choice {
    match std::net::TcpListener::bind(default) {
        Ok(probe) => {
            drop(probe);
            Choice::Embedded(default)
        }
        Err(_) => Choice::Url(local_url(default)),
    }
}

fn local_url(default: SocketAddr) -> String {
    format!("http://127.0.0.1:{}", default.port())
}

/// A one-shot command: the LAN's server, else one on this machine, else none.
async fn one_shot(default: SocketAddr) -> Choice {
    let why_not = match find_lan_server(ONE_SHOT_WAIT).await {
        Ok(Some(found)) => {
            eprintln!(
                "p2p-node: {}",
                using_line(&found.url, Source::Mdns, Some(&found.server.node_id))
            );
            return Choice::Url(found.url);
        }
        Ok(None) => format!(
            "none answered on the LAN via mDNS within {} s",
            ONE_SHOT_WAIT.as_secs()
        ),
        Err(e) => format!("cannot look on the LAN: {e}"),
    };
    let url = local_url(default);
    if check_url(&url).await {
        eprintln!("p2p-node: using the discovery server on this machine at {url} ({why_not})");
        return Choice::Url(url);
    }
    eprintln!(
        "p2p-node: no discovery server found ({why_not}, none on this machine); \
         start `p2p-node` or `p2p-node listen` on a machine of this network, \
         or pass --discovery URL"
    );
    Choice::None
}

/// "using LAN discovery at URL (found via mDNS; server FINGERPRINT)", and the like.
fn using_line(url: &str, source: Source, server: Option<&p2p_crypto::NodeId>) -> String {
    match (source, server) {
        (Source::Mdns, Some(id)) => format!(
            "using LAN discovery at {url} (found via mDNS; server {})",
            id.fingerprint()
        ),
        (Source::Mdns, None) => format!("using LAN discovery at {url} (found via mDNS)"),
        (Source::Memory, _) => "using in-process discovery".to_owned(),
        _ => format!("using discovery at {url}"),
    }
}

/// What the user is told about the discovery in use, one or more lines.
pub fn status_text(status: &DiscoveryStatus) -> String {
    if let Some(serving) = &status.serving {
        let mut text = if serving.urls.is_empty() {
            format!(
                "serving discovery on {}; no other machine can reach it (this machine has \
                 no network address besides loopback)",
                serving.addr
            )
        } else if serving.advertised {
            format!(
                "serving discovery for the LAN on {} (advertised via mDNS: nodes on this \
                 network find it by themselves; elsewhere use p2p-node --discovery {})",
                serving.addr,
                serving.urls.join(" or ")
            )
        } else {
            format!(
                "serving discovery on {}; others on the LAN use: p2p-node --discovery {}",
                serving.addr,
                serving.urls.join(" or ")
            )
        };
        if let Some(relay) = serving.relay {
            text.push_str(&format!("\nserving the relay on udp {relay}"));
        }
        return text;
    }
    match &status.url {
        Some(url) => using_line(url, status.source, status.server.as_ref()),
        None => "no discovery server for now; looking on the LAN".to_owned(),
    }
}

/// The discovery in use in a few words, for the chat's status line.
pub fn short_label(status: &DiscoveryStatus) -> Option<String> {
    if let Some(serving) = &status.serving {
        return Some(match serving.urls.first() {
            Some(url) => format!("{url} (this node serves it)"),
            None => format!("{} (this node serves it)", serving.addr),
        });
    }
    let url = status.url.as_ref()?;
    Some(match (status.source, status.server) {
        (Source::Mdns, Some(id)) => format!("{url} (mDNS, server {})", id.fingerprint()),
        _ => url.clone(),
    })
}

/// The status as a JSON event for `listen --json`.
pub fn status_json(status: &DiscoveryStatus) -> Value {
    json!({
        "event": "discovery",
        "url": status.url,
        "source": match status.source {
            Source::Configured => "configured",
            Source::Mdns => "mdns",
            Source::Serving => "serving",
            Source::Memory => "memory",
        },
        "server": status.server.map(|id| id.to_string()),
        "serving": status.serving.as_ref().map(|s| json!({
            "addr": s.addr.to_string(),
            "relay": s.relay.map(|r| r.to_string()),
            "urls": s.urls,
            "advertised": s.advertised,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_node::discovery::Serving;

    fn status(url: Option<&str>, source: Source, serving: Option<Serving>) -> DiscoveryStatus {
        DiscoveryStatus {
            generation: 1,
            url: url.map(str::to_owned),
            server: None,
            source,
            serving,
        }
    }

    #[test]
    fn a_served_lan_server_is_described_with_urls_others_can_use() {
        let serving = Serving {
            addr: "0.0.0.0:7117".parse().expect("address"),
            relay: Some("0.0.0.0:7117".parse().expect("address")),
            urls: vec!["http://10.0.0.2:7117".into()],
            advertised: true,
        };
        let text = status_text(&status(
            Some("http://127.0.0.1:7117"),
            Source::Serving,
            Some(serving),
        ));
        assert!(text.contains("advertised via mDNS"), "{text}");
        assert!(
            text.contains("p2p-node --discovery http://10.0.0.2:7117"),
            "{text}"
        );
        assert!(!text.contains("--discovery http://0.0.0.0"), "{text}");
        assert!(text.contains("relay on udp"), "{text}");
    }

    #[test]
    fn a_server_nobody_else_can_reach_is_said_to_be_so() {
        let serving = Serving {
            addr: "0.0.0.0:7117".parse().expect("address"),
            relay: None,
            urls: Vec::new(),
            advertised: false,
        };
        let text = status_text(&status(None, Source::Serving, Some(serving)));
        assert!(text.contains("no other machine can reach it"), "{text}");
        assert!(!text.contains("--discovery"), "{text}");
    }

    #[test]
    fn a_found_server_is_named_with_its_fingerprint() {
        let id = p2p_crypto::SecretKey::generate().public();
        let mut st = status(Some("http://10.0.0.3:7117"), Source::Mdns, None);
        st.server = Some(id);
        let text = status_text(&st);
        assert_eq!(
            text,
            format!(
                "using LAN discovery at http://10.0.0.3:7117 (found via mDNS; server {})",
                id.fingerprint()
            )
        );
        let js = status_json(&st);
        assert_eq!(js["source"], "mdns");
        assert_eq!(js["server"], id.to_string());
        let none = status_text(&status(None, Source::Mdns, None));
        assert!(none.contains("no discovery server"), "{none}");
    }
}
