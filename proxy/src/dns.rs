//! A small DNS client for discovery: A and AAAA of one absolute name, or the SRV records of a
//! named Service port, asked of given nameservers (or those of `/etc/resolv.conf`), over UDP
//! with TCP when the answer is truncated. No cache: every refresh asks, so pods that come and go
//! are seen within one refresh interval.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{0:?} is not a DNS name")]
    Name(String),
    #[error("no nameservers: none configured and none in /etc/resolv.conf")]
    NoNameservers,
    #[error("nameserver {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("nameserver {server} did not answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("nameserver {server} answered {code}")]
    Server {
        server: SocketAddr,
        code: ResponseCode,
    },
    #[error("nameserver {server} sent a malformed answer")]
    Malformed { server: SocketAddr },
}

/// What a lookup found: `NotFound` is an answer (the name has no records), not a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Found(Vec<IpAddr>),
    NotFound,
}

/// Nameservers from resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

pub fn system_nameservers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

/// Resolves A and AAAA of `name` (taken as absolute), trying each nameserver in turn.
pub async fn resolve(
    name: &str,
    nameservers: &[SocketAddr],
    timeout: Duration,
) -> Result<Answer, DnsError> {
    let mut fqdn = Name::from_ascii(name).map_err(|_| DnsError::Name(name.to_string()))?;
    fqdn.set_fqdn(true);
    if nameservers.is_empty() {
        return Err(DnsError::NoNameservers);
    }
    let mut last_error = None;
    for server in nameservers {
        let v4 = query(*server, &fqdn, RecordType::A, timeout);
        let v6 = query(*server, &fqdn, RecordType::AAAA, timeout);
        match tokio::join!(v4, v6) {
            (Ok(a), Ok(aaaa)) => {
                return Ok(match (a, aaaa) {
                    (Answer::NotFound, Answer::NotFound) => Answer::NotFound,
                    (a, aaaa) => {
                        let mut ips = Vec::new();
                        for answer in [a, aaaa] {
                            if let Answer::Found(found) = answer {
                                ips.extend(found);
                            }
                        }
                        ips.sort();
                        ips.dedup();
                        if ips.is_empty() {
                            Answer::NotFound
                        } else {
                            Answer::Found(ips)
                        }
                    }
                });
            }
            (Err(e), _) | (_, Err(e)) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or(DnsError::NoNameservers))
}

fn request(name: &Name, record_type: RecordType) -> (u16, Vec<u8>) {
    let id = fastrand::u16(..);
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name.clone(), record_type));
    (id, message.to_vec().unwrap_or_default())
}

async fn query(
    server: SocketAddr,
    name: &Name,
    record_type: RecordType,
    timeout: Duration,
) -> Result<Answer, DnsError> {
    let message = exchange(server, name, record_type, timeout).await?;
    let ips: Vec<IpAddr> = message
        .answers
        .iter()
        .filter(|r| r.record_type() == record_type)
        .filter_map(|r| r.data.ip_addr())
        .collect();
    Ok(if ips.is_empty() {
        Answer::NotFound
    } else {
        Answer::Found(ips)
    })
}

/// One question to one server; NXDOMAIN is an empty answer, other errors are errors.
async fn exchange(
    server: SocketAddr,
    name: &Name,
    record_type: RecordType,
    timeout: Duration,
) -> Result<Message, DnsError> {
    let (id, bytes) = request(name, record_type);
    let io = |source| DnsError::Io { server, source };
    let exchange = async {
        let bind: SocketAddr = if server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(server).await.map_err(io)?;
        socket.send(&bytes).await.map_err(io)?;
        let mut buf = vec![0u8; 4096];
        loop {
            let len = socket.recv(&mut buf).await.map_err(io)?;
            match Message::from_vec(&buf[..len]) {
                // Answers to other ids are late answers to earlier queries: keep waiting.
                Ok(message) if message.metadata.id != id => continue,
                Ok(message) if message.metadata.truncation => {
                    return query_tcp(server, &bytes, id).await;
                }
                Ok(message) => return Ok(message),
                Err(_) => return Err(DnsError::Malformed { server }),
            }
        }
    };
    let mut message = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| DnsError::Timeout { server, timeout })??;
    match message.metadata.response_code {
        ResponseCode::NoError => Ok(message),
        ResponseCode::NXDomain => {
            message.answers.clear();
            Ok(message)
        }
        code => Err(DnsError::Server { server, code }),
    }
}

/// Resolves the SRV records of `name` to addresses: each target's port, and its A/AAAA records
/// from the answer's additional section or, where absent there, asked for.
pub async fn resolve_srv(
    name: &str,
    nameservers: &[SocketAddr],
    timeout: Duration,
) -> Result<Vec<SocketAddr>, DnsError> {
    let mut fqdn = Name::from_ascii(name).map_err(|_| DnsError::Name(name.to_string()))?;
    fqdn.set_fqdn(true);
    let mut last_error = DnsError::NoNameservers;
    for server in nameservers {
        let message = match exchange(*server, &fqdn, RecordType::SRV, timeout).await {
            Ok(message) => message,
            Err(e) => {
                last_error = e;
                continue;
            }
        };
        let targets: Vec<(Name, u16)> = message
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) if srv.port > 0 => Some((srv.target.clone(), srv.port)),
                _ => None,
            })
            .collect();
        let mut addrs = Vec::new();
        for (target, port) in targets {
            let mut ips: Vec<IpAddr> = message
                .additionals
                .iter()
                .filter(|r| r.name == target)
                .filter_map(|r| r.data.ip_addr())
                .collect();
            if ips.is_empty()
                && let Answer::Found(found) =
                    resolve(&target.to_ascii(), std::slice::from_ref(server), timeout).await?
            {
                ips = found;
            }
            addrs.extend(ips.into_iter().map(|ip| SocketAddr::new(ip, port)));
        }
        addrs.sort();
        addrs.dedup();
        return Ok(addrs);
    }
    Err(last_error)
}

async fn query_tcp(server: SocketAddr, bytes: &[u8], id: u16) -> Result<Message, DnsError> {
    let io = |source| DnsError::Io { server, source };
    let mut stream = TcpStream::connect(server).await.map_err(io)?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(io)?;
    let len = stream.read_u16().await.map_err(io)?;
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf).await.map_err(io)?;
    match Message::from_vec(&buf) {
        Ok(message) if message.metadata.id == id => Ok(message),
        _ => Err(DnsError::Malformed { server }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers_from_resolv_conf() {
        let text = "search shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
                    options ndots:5\nnameserver fe80::1%eth0\n# nameserver 1.2.3.4\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
