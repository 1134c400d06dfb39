//! Checks on hidden states received from a peer: their shape, and that every value is
//! finite. A NaN or an infinity from a broken or hostile server would otherwise turn
//! into token 0 (argmax over NaN), which ends the text silently.
//!
//! Servers run [`hidden`] on what the hop before sent them and, when it fails, report
//! the hop before (a signed report about the hop before, its message starting with
//! [`NON_FINITE_INPUT`]); the client reads every such report as a dispute between the two
//! hops (see `session::named_failure` and `Bans::dispute`), since either could be lying.
//! The client runs it on the last hop's output: that finding is its own.

use candle_core::Tensor;

/// How a server's report of non-finite input from the hop before starts (for people
/// reading logs: the report's place in the route is what the client judges by).
pub const NON_FINITE_INPUT: &str = "non-finite hidden states from the hop before";

/// How a server's refusal of a session asking for more tokens than it holds per session
/// starts (`pollen api` answers it as a prompt too long, not as busy).
pub const SESSION_CAP: &str = "session cap:";

/// How the client's own finding of a wrong output (non-finite, or caught by a spot
/// check) starts: a server blamed with it is left out of every route while banned, even
/// when no other route exists.
pub const WRONG_OUTPUT: &str = "wrong output:";

/// Why hidden states were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadHidden {
    /// Not `[1, rows, hidden]`.
    #[error("hidden states of shape {got:?}, expected [1, {rows}, {hidden}]")]
    Shape {
        /// What arrived.
        got: Vec<usize>,
        /// Rows expected (0: any number of rows).
        rows: usize,
        /// The model's hidden size.
        hidden: usize,
    },
    /// Some value is NaN or infinite.
    #[error("{count} of {total} hidden-state values are NaN or infinite")]
    NonFinite {
        /// How many.
        count: usize,
        /// Of how many.
        total: usize,
    },
    /// The tensor could not be read.
    #[error("hidden states unreadable: {0}")]
    Unreadable(String),
}

/// Checks that `t` is `[1, rows, hidden]` (any `rows` when `rows` is 0) and that every
/// value is finite.
pub fn hidden(t: &Tensor, rows: usize, hidden: usize) -> Result<(), BadHidden> {
    let dims = t.dims();
    let shape_ok = dims.len() == 3
        && dims[0] == 1
        && dims[1] > 0
        && (rows == 0 || dims[1] == rows)
        && dims[2] == hidden;
    if !shape_ok {
        return Err(BadHidden::Shape {
            got: dims.to_vec(),
            rows,
            hidden,
        });
    }
    let values = t
        .flatten_all()
        .and_then(|f| f.to_dtype(candle_core::DType::F32))
        .and_then(|f| f.to_vec1::<f32>())
        .map_err(|e| BadHidden::Unreadable(e.to_string()))?;
    let count = values.iter().filter(|v| !v.is_finite()).count();
    if count > 0 {
        return Err(BadHidden::NonFinite {
            count,
            total: values.len(),
        });
    }
    Ok(())
}

/// The largest absolute difference between two tensors of one shape, relative to the
/// largest absolute value of `a` (at least 1): how far two servers' outputs for the
/// same step disagree. `None` when the shapes differ or a value is not finite.
pub fn relative_gap(a: &Tensor, b: &Tensor) -> Option<f32> {
    if a.dims() != b.dims() {
        return None;
    }
    let read = |t: &Tensor| {
        t.flatten_all()
            .and_then(|f| f.to_dtype(candle_core::DType::F32))
            .and_then(|f| f.to_vec1::<f32>())
            .ok()
    };
    let (a, b) = (read(a)?, read(b)?);
    let mut scale = 1.0f32;
    let mut gap = 0.0f32;
    for (x, y) in a.iter().zip(&b) {
        if !x.is_finite() || !y.is_finite() {
            return None;
        }
        scale = scale.max(x.abs());
        gap = gap.max((x - y).abs());
    }
    Some(gap / scale)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    fn t(v: Vec<f32>, n: usize) -> Tensor {
        Tensor::from_vec(v, (1, n, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn shapes_and_non_finite_values_are_refused() {
        assert!(hidden(&t(vec![1.0, 2.0], 1), 1, 2).is_ok());
        assert!(hidden(&t(vec![1.0; 4], 2), 0, 2).is_ok());
        assert!(matches!(
            hidden(&t(vec![1.0; 4], 2), 1, 2),
            Err(BadHidden::Shape { .. })
        ));
        assert!(matches!(
            hidden(&t(vec![1.0, 2.0], 1), 1, 3),
            Err(BadHidden::Shape { .. })
        ));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(
                hidden(&t(vec![1.0, bad], 1), 1, 2),
                Err(BadHidden::NonFinite { count: 1, total: 2 })
            );
        }
    }

    #[test]
    fn relative_gap_measures_disagreement() {
        let a = t(vec![10.0, -20.0], 1);
        assert_eq!(relative_gap(&a, &a), Some(0.0));
        let b = t(vec![10.0, -20.2], 1);
        let g = relative_gap(&a, &b).unwrap();
        assert!((g - 0.01).abs() < 1e-4, "{g}");
        assert_eq!(relative_gap(&a, &t(vec![1.0; 4], 2)), None);
        assert_eq!(relative_gap(&a, &t(vec![f32::NAN, 1.0], 1)), None);
    }
}
