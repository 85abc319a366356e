//! A field reader over a JSON object that records faults with their path instead of failing on
//! the first, and flags fields nobody asked for (typos must not be silently ignored).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::parse::Fault;

/// Collects faults for one document.
#[derive(Default)]
pub(crate) struct Faults(RefCell<Vec<Fault>>);

impl Faults {
    pub fn add(&self, path: &str, message: impl Into<String>) {
        self.0.borrow_mut().push(Fault {
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub fn into_vec(self) -> Vec<Fault> {
        self.0.into_inner()
    }
}

pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One JSON object being read. Unknown fields are reported when it is dropped via `finish`.
pub(crate) struct Object<'a> {
    pub path: String,
    map: &'a Map<String, Value>,
    seen: RefCell<BTreeSet<&'a str>>,
    faults: &'a Faults,
}

impl<'a> Object<'a> {
    /// `None` (with a fault) when `value` is not an object.
    pub fn new(path: String, value: &'a Value, faults: &'a Faults) -> Option<Self> {
        match value {
            Value::Object(map) => Some(Self {
                path,
                map,
                seen: RefCell::default(),
                faults,
            }),
            other => {
                faults.add(&path, format!("must be an object, got {}", kind(other)));
                None
            }
        }
    }

    pub fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn fault(&self, key: &str, message: impl Into<String>) {
        self.faults.add(&self.field_path(key), message);
    }

    pub fn faults(&self) -> &'a Faults {
        self.faults
    }

    /// Every field name present.
    pub fn keys(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.map.keys().map(String::as_str)
    }

    /// The raw value of a field, if present and not null.
    pub fn get(&self, key: &'a str) -> Option<&'a Value> {
        self.seen.borrow_mut().insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn required(&self, key: &'a str) -> Option<&'a Value> {
        let value = self.get(key);
        if value.is_none() {
            self.fault(key, "is required");
        }
        value
    }

    pub fn object(&self, key: &'a str) -> Option<Object<'a>> {
        self.get(key)
            .and_then(|v| Object::new(self.field_path(key), v, self.faults))
    }

    pub fn string(&self, key: &'a str) -> Option<&'a str> {
        self.get(key).and_then(|v| self.as_str(key, v))
    }

    pub fn required_string(&self, key: &'a str) -> Option<&'a str> {
        self.required(key).and_then(|v| self.as_str(key, v))
    }

    fn as_str(&self, key: &str, value: &'a Value) -> Option<&'a str> {
        match value {
            Value::String(s) => Some(s),
            other => {
                self.fault(key, format!("must be a string, got {}", kind(other)));
                None
            }
        }
    }

    pub fn bool_or(&self, key: &'a str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.fault(key, format!("must be true or false, got {}", kind(other)));
                default
            }
        }
    }

    /// An integer within `min..=max`, or `default` when absent.
    pub fn uint_or(&self, key: &'a str, default: u64, min: u64, max: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(v) => check_uint(v, min, max).unwrap_or_else(|message| {
                self.fault(key, message);
                default
            }),
        }
    }

    pub fn duration_or(&self, key: &'a str, default: Duration, min: Duration) -> Duration {
        self.opt_duration(key, min).unwrap_or(default)
    }

    pub fn opt_duration(&self, key: &'a str, min: Duration) -> Option<Duration> {
        let text = self.string(key)?;
        match crate::duration::parse(text) {
            Ok(d) if d >= min => Some(d),
            Ok(_) => {
                self.fault(
                    key,
                    format!(
                        "must be at least {}, got {text:?}",
                        crate::duration::format(min)
                    ),
                );
                None
            }
            Err(message) => {
                self.fault(key, message);
                None
            }
        }
    }

    pub fn socket_addr_or(&self, key: &'a str, default: SocketAddr) -> SocketAddr {
        match self.string(key) {
            None => default,
            Some(text) => parse_socket_addr(text, None).unwrap_or_else(|message| {
                self.fault(key, message);
                default
            }),
        }
    }

    /// Reports every field present that no reader asked for.
    pub fn finish(self) {
        let seen = self.seen.borrow();
        for key in self.map.keys() {
            if !seen.contains(key.as_str()) {
                self.fault(key, "unknown field");
            }
        }
    }
}

pub(crate) fn check_uint(value: &Value, min: u64, max: u64) -> Result<u64, String> {
    match value.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(n) => Err(format!("must be {min}..={max}, got {n}")),
        None if value.is_number() => {
            Err(format!("must be a whole number {min}..={max}, got {value}"))
        }
        None => Err(format!(
            "must be a number {min}..={max}, got {}",
            kind(value)
        )),
    }
}

/// `ip:port`, `[v6]:port`, or a bare IP when `default_port` is given.
pub(crate) fn parse_socket_addr(
    text: &str,
    default_port: Option<u16>,
) -> Result<SocketAddr, String> {
    if let Ok(addr) = SocketAddr::from_str(text) {
        return Ok(addr);
    }
    if let (Some(port), Ok(ip)) = (default_port, std::net::IpAddr::from_str(text)) {
        return Ok(SocketAddr::new(ip, port));
    }
    Err(match default_port {
        Some(_) => format!("{text:?} is not an IP address or ip:port"),
        None => format!("{text:?} is not an ip:port address (e.g. \"127.0.0.1:15001\")"),
    })
}
