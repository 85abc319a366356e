use std::net::IpAddr;
use std::time::Duration;

use fanout_certs::{Ca, service_dns_names, write_bundle};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

fn sans(cert_pem: &str) -> (Vec<String>, Vec<IpAddr>) {
    let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for name in &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
    {
        match name {
            GeneralName::DNSName(n) => dns.push(n.to_string()),
            GeneralName::IPAddress(b) if b.len() == 4 => {
                ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()))
            }
            _ => {}
        }
    }
    (dns, ips)
}

#[test]
fn serving_cert_names_what_the_api_server_dials_and_verifies_against_the_ca() {
    let ca = Ca::generate("test CA", Duration::from_secs(3600)).unwrap();
    let names = service_dns_names("fanout-webhook", "fanout-system", "cluster.local");
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let serving = ca
        .issue_serving(&names, &[ip], Duration::from_secs(3600))
        .unwrap();

    let (dns, ips) = sans(&serving.cert_pem);
    assert!(
        dns.contains(&"fanout-webhook.fanout-system.svc".to_string()),
        "{dns:?}"
    );
    assert_eq!(dns, names);
    assert_eq!(ips, vec![ip]);

    let (_, ca_pem) = parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
    let ca_cert = ca_pem.parse_x509().unwrap();
    assert!(ca_cert.is_ca());
    let (_, leaf_pem) = parse_x509_pem(serving.cert_pem.as_bytes()).unwrap();
    let leaf = leaf_pem.parse_x509().unwrap();
    assert_eq!(leaf.issuer(), ca_cert.subject());
    leaf.verify_signature(Some(ca_cert.public_key()))
        .expect("serving cert is signed by the CA");
    // A second CA must not verify it.
    let other = Ca::generate("other", Duration::from_secs(3600)).unwrap();
    let (_, other_pem) = parse_x509_pem(other.cert_pem().as_bytes()).unwrap();
    assert!(
        leaf.verify_signature(Some(other_pem.parse_x509().unwrap().public_key()))
            .is_err()
    );
}

#[test]
fn a_loaded_ca_keeps_signing_with_the_same_key() {
    let ca = Ca::generate("test CA", Duration::from_secs(3600)).unwrap();
    let loaded = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    let serving = loaded
        .issue_serving(&["svc.ns.svc".into()], &[], Duration::from_secs(60))
        .unwrap();
    let (_, ca_pem) = parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
    let (_, leaf_pem) = parse_x509_pem(serving.cert_pem.as_bytes()).unwrap();
    leaf_pem
        .parse_x509()
        .unwrap()
        .verify_signature(Some(ca_pem.parse_x509().unwrap().public_key()))
        .unwrap();
    assert!(Ca::from_pem("not pem", &ca.key_pem()).is_err());
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let ca = Ca::generate("test CA", Duration::from_secs(3600)).unwrap();
    assert!(ca.issue_serving(&[], &[], Duration::from_secs(60)).is_err());
    assert!(
        ca.issue_serving(&["bad name!".into()], &[], Duration::from_secs(60))
            .is_err()
    );
}

#[test]
fn bundle_files_are_written_with_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test CA", Duration::from_secs(3600)).unwrap();
    let serving = ca
        .issue_serving(&["localhost".into()], &[], Duration::from_secs(60))
        .unwrap();
    write_bundle(dir.path(), &ca, &serving).unwrap();
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("tls.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
}

#[test]
fn inspection_reads_lifetime_names_and_issuer_back() {
    let ca = Ca::generate("test CA", Duration::from_secs(10 * 86400)).unwrap();
    let names = service_dns_names("fanout-webhook", "fanout-system", "cluster.local");
    let serving = ca
        .issue_serving(&names, &[], Duration::from_secs(3 * 86400))
        .unwrap();
    let now = std::time::SystemTime::now();
    let ca_info = fanout_certs::inspect(ca.cert_pem()).unwrap();
    let leaf = fanout_certs::inspect(&serving.cert_pem).unwrap();
    assert!(ca_info.is_ca && !leaf.is_ca);
    let days = |d: Duration| d.as_secs() / 86400;
    assert_eq!(days(leaf.remaining(now)), 2, "3 days less a moment");
    assert_eq!(days(ca_info.remaining(now)), 9);
    assert!(leaf.covers(&names));
    assert!(!leaf.covers(&["other.fanout-system.svc".to_string()]));
    assert!(leaf.is_signed_by(&ca_info));
    let other = Ca::generate("other", Duration::from_secs(3600)).unwrap();
    assert!(!leaf.is_signed_by(&fanout_certs::inspect(other.cert_pem()).unwrap()));

    // A bundle of two CAs reads as two, in order; the first one signs.
    let bundle = format!("{}{}", ca.cert_pem(), other.cert_pem());
    let all = fanout_certs::inspect_all(&bundle).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], ca_info);
    let reloaded = Ca::from_pem(&bundle, &ca.key_pem()).unwrap();
    let again = reloaded
        .issue_serving(&names, &[], Duration::from_secs(3600))
        .unwrap();
    assert!(
        fanout_certs::inspect(&again.cert_pem)
            .unwrap()
            .is_signed_by(&ca_info)
    );
}

#[test]
fn a_ca_with_a_key_that_is_not_its_own_is_refused() {
    let ca = Ca::generate("test CA", Duration::from_secs(3600)).unwrap();
    let other = Ca::generate("other", Duration::from_secs(3600)).unwrap();
    let error = Ca::from_pem(ca.cert_pem(), &other.key_pem()).err().unwrap();
    assert!(
        matches!(error, fanout_certs::CertError::CaKeyMismatch),
        "{error}"
    );
    assert!(fanout_certs::inspect("no PEM here").is_err());
}
