//! Kubernetes resource quantities (`10m`, `16Mi`, `1.5`, `1e3`), parsed enough to validate the
//! proxy resource annotations and compare a request with its limit before the API server would
//! refuse the pod with a less helpful message.

/// The value of a quantity in base units (cores or bytes).
pub fn parse(text: &str) -> Result<f64, String> {
    let bad = || {
        format!("{text:?} is not a Kubernetes quantity (e.g. \"100m\", \"0.5\", \"64Mi\", \"1G\")")
    };
    if text.is_empty() || text.starts_with('-') {
        return Err(bad());
    }
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let power: i32 = exp[1..].parse().map_err(|_| bad())?;
            if !(-18..=18).contains(&power) {
                return Err(bad());
            }
            10f64.powi(power)
        }
        _ => return Err(bad()),
    };
    Ok(value * multiplier)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_kubernetes_quantities() {
        assert_eq!(parse("10m"), Ok(0.01));
        assert_eq!(parse("1"), Ok(1.0));
        assert_eq!(parse("0.5"), Ok(0.5));
        assert_eq!(parse("16Mi"), Ok(16.0 * 1024.0 * 1024.0));
        assert_eq!(parse("1G"), Ok(1e9));
        assert_eq!(parse("1e3"), Ok(1000.0));
    }

    #[test]
    fn rejects_malformed_quantities() {
        for bad in ["", "-1", "abc", "10 m", "1.2.3", "5MB", "m", "1e99", "."] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
