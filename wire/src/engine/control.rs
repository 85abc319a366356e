//! The frames that steer a connection rather than carry a call: SETTINGS, PING, WINDOW_UPDATE,
//! RST_STREAM, PRIORITY and GOAWAY, each checked as RFC 9113 §6 asks (a frame of the wrong
//! size or on the wrong stream ends the connection with the code the RFC names).

use std::rc::Rc;

use fanout_balance::retry::Pushback;

use super::policy::{self, Fallback, Outcome};
use super::report::ClientGot;
use super::streams::{give_back, is_idle, reset_other_side, reset_stream};
use super::{Conn, Fatal, Forwarder, Role, flow, held, replay};
use crate::frame::{self, Head};

/// The largest window RFC 9113 §6.9.1 allows.
const MAX_WINDOW: i64 = 0x7fff_ffff;

pub fn on_settings(
    conn: &Rc<Conn>,
    fwd: &Forwarder,
    head: Head,
    payload: &[u8],
) -> Result<(), Fatal> {
    if head.stream != 0 {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    if head.has(frame::ACK) {
        return if payload.is_empty() {
            Ok(())
        } else {
            Err(Fatal(frame::FRAME_SIZE_ERROR))
        };
    }
    if !payload.len().is_multiple_of(6) {
        return Err(Fatal(frame::FRAME_SIZE_ERROR));
    }
    let mut grew = false;
    for setting in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([setting[0], setting[1]]);
        let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
        match id {
            frame::SETTINGS_ENABLE_PUSH if value > 1 => {
                return Err(Fatal(frame::PROTOCOL_ERROR));
            }
            frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                if value as i64 > MAX_WINDOW {
                    return Err(Fatal(frame::FLOW_CONTROL_ERROR));
                }
                let delta = value as i64 - conn.peer_initial_window.replace(value as i64);
                for route in conn.routes.borrow_mut().values_mut() {
                    route.send_window += delta;
                    if route.send_window > MAX_WINDOW {
                        return Err(Fatal(frame::FLOW_CONTROL_ERROR));
                    }
                }
                grew |= delta > 0;
            }
            frame::SETTINGS_MAX_FRAME_SIZE => {
                if !(16_384..=16_777_215).contains(&value) {
                    return Err(Fatal(frame::PROTOCOL_ERROR));
                }
                conn.peer_max_frame.set(value as usize);
            }
            // Unknown settings are ignored (§6.5.2); the others do not change what the
            // forwarder sends (its encoder keeps no table, it never pushes).
            _ => {}
        }
    }
    frame::put_head(
        &mut conn.out.borrow_mut(),
        0,
        frame::SETTINGS,
        frame::ACK,
        0,
    );
    if grew {
        flow::drain_all(fwd, conn);
    }
    Ok(())
}

pub fn on_ping(conn: &Conn, fwd: &Forwarder, head: Head, payload: &[u8]) -> Result<(), Fatal> {
    if head.stream != 0 {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    if payload.len() != 8 {
        return Err(Fatal(frame::FRAME_SIZE_ERROR));
    }
    if !head.has(frame::ACK) {
        let mut out = conn.out.borrow_mut();
        frame::put_head(&mut out, 8, frame::PING, frame::ACK, 0);
        out.extend_from_slice(payload);
    } else if conn.awaiting_pong.replace(false) {
        // The answer to our PING (an endpoint's connection; we send none to clients).
        conn.last_pong.set(tokio::time::Instant::now());
        if !conn.ready.replace(true) {
            fwd.endpoint_settled.notify_waiters();
            fwd.report_now.notify_one();
            held::open_waiting(fwd);
        }
    }
    Ok(())
}

pub fn on_window_update(
    conn: &Rc<Conn>,
    fwd: &Forwarder,
    head: Head,
    payload: &[u8],
) -> Result<(), Fatal> {
    let bytes: [u8; 4] = payload
        .try_into()
        .map_err(|_| Fatal(frame::FRAME_SIZE_ERROR))?;
    let increment = (u32::from_be_bytes(bytes) & 0x7fff_ffff) as i64;
    if head.stream == 0 {
        if increment == 0 {
            return Err(Fatal(frame::PROTOCOL_ERROR));
        }
        let window = conn.send_window.get() + increment;
        if window > MAX_WINDOW {
            return Err(Fatal(frame::FLOW_CONTROL_ERROR));
        }
        conn.send_window.set(window);
        flow::drain_blocked(fwd, conn);
        return Ok(());
    }
    if is_idle(conn, head.stream) {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    let overflow = {
        let mut routes = conn.routes.borrow_mut();
        let Some(route) = routes.get_mut(&head.stream) else {
            // A stream already closed: WINDOW_UPDATEs may still be on their way.
            return Ok(());
        };
        if increment == 0 {
            Some(frame::PROTOCOL_ERROR)
        } else {
            route.send_window += increment;
            (route.send_window > MAX_WINDOW).then_some(frame::FLOW_CONTROL_ERROR)
        }
    };
    match overflow {
        Some(code) => reset_stream(conn, fwd, head.stream, code),
        None => flow::drain(fwd, conn, head.stream),
    }
    Ok(())
}

pub fn on_rst_stream(
    conn: &Rc<Conn>,
    fwd: &Forwarder,
    head: Head,
    payload: &[u8],
) -> Result<(), Fatal> {
    if head.stream == 0 {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    let code: [u8; 4] = payload
        .try_into()
        .map_err(|_| Fatal(frame::FRAME_SIZE_ERROR))?;
    if is_idle(conn, head.stream) {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    let route = conn.routes.borrow_mut().remove(&head.stream);
    let code = u32::from_be_bytes(code);
    match route {
        Some(route) if conn.role == Role::Upstream && code == frame::REFUSED_STREAM => {
            replay::refused(fwd, conn, route, "refused");
        }
        // A reset before any answer: the call's retry policy may send it again.
        Some(route)
            if conn.role == Role::Upstream
                && !route.headers_seen
                && policy::after_failure(
                    fwd,
                    (&route.peer, route.peer_stream),
                    route.retry.as_deref(),
                    (Some(policy::status_of_reset(code)), Pushback::Absent),
                    conn,
                    || Fallback::Reset(code),
                ) == Outcome::Retried =>
        {
            give_back(fwd, &route);
        }
        Some(route) => {
            if conn.role == Role::Upstream {
                let reason = if route.headers_seen {
                    "reset while the response streamed"
                } else {
                    "reset by the endpoint before its answer"
                };
                let endpoint = route.account.as_ref().map(|a| a.endpoint_addr());
                let got = ClientGot::Reset(code);
                fwd.calls.observer.call_failed(endpoint, got, reason);
            }
            reset_other_side(fwd, &route, code)
        }
        None => held::cancel(fwd, conn, head.stream),
    }
    Ok(())
}

pub fn on_priority(head: Head, payload: &[u8]) -> Result<(), Fatal> {
    if head.stream == 0 {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    if payload.len() != 5 {
        return Err(Fatal(frame::FRAME_SIZE_ERROR));
    }
    // Priorities are deprecated (§5.3.2) and mean nothing to a forwarder.
    Ok(())
}

/// An endpoint that is leaving takes no new streams; those above its last processed stream
/// were never seen by it, and are refused to their clients (a client may retry them
/// anywhere). A client's GOAWAY ends its connection once its streams are done.
pub fn on_goaway(
    conn: &Rc<Conn>,
    fwd: &Forwarder,
    head: Head,
    payload: &[u8],
) -> Result<(), Fatal> {
    if head.stream != 0 {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    let Some(last) = payload.get(..4) else {
        return Err(Fatal(frame::FRAME_SIZE_ERROR));
    };
    if payload.len() < 8 {
        return Err(Fatal(frame::FRAME_SIZE_ERROR));
    }
    let last = u32::from_be_bytes([last[0], last[1], last[2], last[3]]) & 0x7fff_ffff;
    conn.leaving.set(true);
    if conn.role == Role::Upstream {
        // Its keeper opens the next connection now, while this one finishes its streams.
        conn.retired.notify_one();
        let refused: Vec<u32> = conn
            .routes
            .borrow()
            .keys()
            .copied()
            .filter(|&id| id > last)
            .collect();
        for id in refused {
            let route = conn.routes.borrow_mut().remove(&id);
            if let Some(route) = route {
                replay::refused(fwd, conn, route, "goaway");
            }
        }
    }
    if conn.routes.borrow().is_empty() {
        conn.closed.set(true);
    }
    Ok(())
}
