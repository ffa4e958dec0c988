//! Go's `strconv.FormatFloat(v, 'g', -1, 64)`, which upstream's syslog converter writes gauge
//! values with: the shortest digits that read back to `v`, in exponent form exactly when the
//! decimal exponent is below -4 or at least 6 (`1e-05`, `1.234567e+06`: the exponent signed and
//! at least two digits), plain otherwise; `NaN`, `+Inf`, `-Inf`, `-0`.
//!
//! Rust's `{:e}` gives the same shortest round-trip digits Go's algorithm picks (both the
//! shortest that round-trips, the closest to the exact value among them); only the layout
//! differs, and is rebuilt here.

use std::fmt::Write as _;

/// `v` as Go's `strconv.FormatFloat(v, 'g', -1, 64)` writes it.
pub fn format_g(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
        return;
    }
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
        return;
    }
    // "-1.234567e6", "0e0", "-0e0", "5e-324".
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if negative {
        out.push('-');
    }
    if !(-4..6).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp < 0 {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let point = exp as usize + 1;
        if digits.len() <= point {
            out.push_str(&digits);
            for _ in digits.len()..point {
                out.push('0');
            }
        } else {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(v: f64) -> String {
        let mut s = String::new();
        format_g(v, &mut s);
        s
    }

    /// Upstream's real output (the reference's §1.4) and Go's documented behaviour.
    #[test]
    fn matches_go() {
        for (v, want) in [
            (0.0, "0"),
            (-0.0, "-0"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456.0, "123456"),
            (1234567.0, "1.234567e+06"),
            (1e6, "1e+06"),
            (12345678.9, "1.23456789e+07"),
            (123456789.0, "1.23456789e+08"),
            (5e-324, "5e-324"),
            (1e21, "1e+21"),
            (0.23, "0.23"),
            (1234.0, "1234"),
            (-1.5, "-1.5"),
            (100.0, "100"),
            (999999.0, "999999"),
            (0.000123, "0.000123"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
        ] {
            assert_eq!(g(v), want, "{v:e}");
        }
    }

    proptest! {
        /// Whatever the value, the text reads back to it exactly.
        #[test]
        fn reads_back_to_the_same_value(bits in any::<u64>()) {
            let v = f64::from_bits(bits);
            prop_assume!(v.is_finite());
            let text = g(v);
            let back: f64 = text.parse().expect("a float");
            prop_assert_eq!(back.to_bits(), v.to_bits(), "{}", text);
        }
    }
}
