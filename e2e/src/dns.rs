//! A test DNS server on loopback: A, AAAA and SRV records that tests change while the proxy
//! runs, as Kubernetes DNS changes a headless Service's records when pods come and go.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// Answers larger than this over UDP are truncated, so clients retry over TCP (RFC 1035).
const UDP_LIMIT: usize = 512;

#[derive(Default)]
struct Zone {
    records: RwLock<HashMap<String, Vec<IpAddr>>>,
    /// SRV name → (target, port); targets' addresses come from `records`.
    srv: RwLock<HashMap<String, Vec<(String, u16)>>>,
    /// Whether SRV answers carry the targets' addresses (as CoreDNS does) or leave the client
    /// to ask.
    srv_additionals: AtomicBool,
    failing: AtomicBool,
    queries: AtomicU64,
}

/// A running server; dropping it leaves the tasks running until the runtime ends.
#[derive(Clone)]
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Zone>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    /// Serves UDP and TCP on `addr` (port 0 picks one; both use the same port).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let (udp, tcp) = bind_both(addr).await?;
        let addr = udp.local_addr()?;
        let zone = Arc::new(Zone::default());
        tokio::spawn(serve_udp(udp, zone.clone()));
        tokio::spawn(serve_tcp(tcp, zone.clone()));
        Ok(Self { addr, zone })
    }

    /// Sets every address `name` resolves to; an empty list leaves the name with no records.
    pub fn set(&self, name: &str, ips: &[IpAddr]) {
        self.zone
            .records
            .write()
            .unwrap()
            .insert(key(name), ips.to_vec());
    }

    /// Sets the SRV records of `name`: each target with its port. `additionals`: answers carry
    /// the targets' A/AAAA records too.
    pub fn set_srv(&self, name: &str, targets: &[(&str, u16)], additionals: bool) {
        self.zone.srv.write().unwrap().insert(
            key(name),
            targets.iter().map(|(t, p)| (key(t), *p)).collect(),
        );
        self.zone
            .srv_additionals
            .store(additionals, Ordering::SeqCst);
    }

    pub fn remove(&self, name: &str) {
        self.zone.records.write().unwrap().remove(&key(name));
    }

    /// While failing, every query is answered SERVFAIL.
    pub fn set_failing(&self, failing: bool) {
        self.zone.failing.store(failing, Ordering::SeqCst);
    }

    pub fn queries(&self) -> u64 {
        self.zone.queries.load(Ordering::SeqCst)
    }
}

fn answer(zone: &Zone, request: &[u8]) -> Option<Message> {
    let request = Message::from_vec(request).ok()?;
    zone.queries.fetch_add(1, Ordering::SeqCst);
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.message_type = MessageType::Response;
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    for query in &request.queries {
        response.add_query(query.clone());
    }
    if zone.failing.load(Ordering::SeqCst) {
        response.metadata.response_code = ResponseCode::ServFail;
        return Some(response);
    }
    let records = zone.records.read().unwrap();
    for query in &request.queries {
        let name = query.name();
        if query.query_type() == RecordType::SRV {
            let srv = zone.srv.read().unwrap();
            let Some(targets) = srv.get(&key(&name.to_ascii())) else {
                response.metadata.response_code = ResponseCode::NXDomain;
                continue;
            };
            for (target, port) in targets {
                let Ok(target_name) = Name::from_ascii(format!("{target}.")) else {
                    continue;
                };
                let rdata = RData::SRV(SRV::new(0, 100, *port, target_name.clone()));
                response.add_answer(Record::from_rdata(name.clone(), 0, rdata));
                if zone.srv_additionals.load(Ordering::SeqCst) {
                    for ip in records.get(target).into_iter().flatten() {
                        let rdata = match ip {
                            IpAddr::V4(v4) => RData::A(A(*v4)),
                            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                        };
                        response.add_additional(Record::from_rdata(target_name.clone(), 0, rdata));
                    }
                }
            }
            continue;
        }
        let Some(ips) = records.get(&key(&name.to_ascii())) else {
            response.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        for ip in ips {
            let rdata = match (query.query_type(), ip) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            // TTL 0: Kubernetes DNS serves headless records with a short TTL; tests want none.
            response.add_answer(Record::from_rdata(name.clone(), 0, rdata));
        }
    }
    Some(response)
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Zone>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some(response) = answer(&zone, &buf[..len]) else {
            continue;
        };
        let Ok(mut bytes) = response.to_vec() else {
            continue;
        };
        if bytes.len() > UDP_LIMIT {
            let mut truncated = response.truncate();
            truncated.metadata.truncation = true;
            bytes = truncated.to_vec().unwrap_or_default();
        }
        let _ = socket.send_to(&bytes, peer).await;
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let zone = zone.clone();
        tokio::spawn(async move {
            loop {
                let Ok(len) = stream.read_u16().await else {
                    return;
                };
                let mut request = vec![0u8; len as usize];
                if stream.read_exact(&mut request).await.is_err() {
                    return;
                }
                let Some(bytes) = answer(&zone, &request).and_then(|r| r.to_vec().ok()) else {
                    return;
                };
                let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&bytes);
                if stream.write_all(&framed).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// UDP and TCP on one port. With port 0 the kernel picks a free UDP port, which a TCP socket
/// (another test's connection, say) may already hold: then another port is tried.
async fn bind_both(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut attempts = 0;
    loop {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && addr.port() == 0
                    && attempts < 20 =>
            {
                attempts += 1;
                tracing::debug!(error = %e, "test DNS server: port taken for TCP, trying another");
            }
            Err(e) => return Err(e),
        }
    }
}
