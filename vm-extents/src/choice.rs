//! Options with a fixed set of named values ([`Choice`]): the names a command line or a
//! configuration file writes them with, and one line of help for each, declared beside the
//! type so that every front end offers the same names.

/// A value chosen from a fixed set by name.
pub trait Choice: Copy + Eq + Sized + 'static {
    /// Every value, its name and one line of help, in the order to offer them.
    const CHOICES: &'static [(Self, &'static str, &'static str)];

    /// The value's name.
    fn name(self) -> &'static str {
        Self::CHOICES
            .iter()
            .find(|(v, _, _)| *v == self)
            .map(|&(_, name, _)| name)
            .expect("every value is among the choices")
    }

    /// The value called `name`, if one is.
    fn from_name(name: &str) -> Option<Self> {
        Self::CHOICES
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|&(v, _, _)| v)
    }
}

/// A name that is none of a [`Choice`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not one of {}", allowed.join(", "))]
pub struct UnknownChoice {
    /// The name given.
    pub given: String,
    /// The names allowed.
    pub allowed: Vec<&'static str>,
}

/// Implements [`Choice`], `FromStr` and `Display` (the name) for an enum of unit variants:
/// `choices!(Backing { Small = "small": "4 KiB pages", ... });`
macro_rules! choices {
    ($ty:ident { $($variant:ident = $name:literal : $help:literal),+ $(,)? }) => {
        impl $crate::choice::Choice for $ty {
            const CHOICES: &'static [(Self, &'static str, &'static str)] =
                &[$(($ty::$variant, $name, $help)),+];
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::choice::UnknownChoice;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                use $crate::choice::Choice;
                Self::from_name(s).ok_or_else(|| $crate::choice::UnknownChoice {
                    given: s.into(),
                    allowed: Self::CHOICES.iter().map(|&(_, name, _)| name).collect(),
                })
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($crate::choice::Choice::name(*self))
            }
        }
    };
}
pub(crate) use choices;
