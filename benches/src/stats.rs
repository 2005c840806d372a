//! Summaries of repeated measurements.

use serde::Serialize;

/// Minimum, median and maximum of a set of measurements.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// The summary of `values`, or `None` when there are none. The median of
    /// an even count is the mean of the two middle values.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Summary { min, median, max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_has_no_summary() {
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn single_value_is_min_median_and_max() {
        let summary = Summary::of(&[7.5]).unwrap();
        assert_eq!(
            summary,
            Summary {
                min: 7.5,
                median: 7.5,
                max: 7.5
            }
        );
    }

    #[test]
    fn odd_count_takes_the_middle_of_the_sorted_values() {
        let summary = Summary::of(&[30.0, 10.0, 50.0, 20.0, 40.0]).unwrap();
        assert_eq!(
            summary,
            Summary {
                min: 10.0,
                median: 30.0,
                max: 50.0
            }
        );
    }

    #[test]
    fn even_count_averages_the_two_middle_values() {
        let summary = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            summary,
            Summary {
                min: 1.0,
                median: 2.5,
                max: 4.0
            }
        );
    }

    #[test]
    fn input_order_does_not_matter_and_is_not_changed() {
        let values = [3.0, 1.0, 2.0];
        assert_eq!(Summary::of(&values), Summary::of(&[1.0, 2.0, 3.0]));
        assert_eq!(values, [3.0, 1.0, 2.0]);
    }
}
