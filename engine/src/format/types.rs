//! Newtypes for the kinds of numbers qcow2 address translation mixes: guest byte offsets,
//! host byte offsets, guest and host cluster indices. Keeping them distinct makes index math
//! that confuses guest and host space fail to compile.

use std::fmt;

macro_rules! offset_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }
            /// Adds `n` bytes, `None` on overflow.
            #[inline]
            pub fn checked_add(self, n: u64) -> Option<Self> {
                self.0.checked_add(n).map(Self)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl std::ops::Add<u64> for $name {
            type Output = $name;
            #[inline]
            fn add(self, rhs: u64) -> $name {
                $name(self.0 + rhs)
            }
        }
    };
}

offset_newtype!(
    /// A byte offset in the guest's (virtual disk's) address space.
    GuestOffset
);
offset_newtype!(
    /// A byte offset in the image file (host address space).
    HostOffset
);

macro_rules! index_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw index.
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

index_newtype!(
    /// Index of a cluster in guest space (`guest offset >> cluster_bits`).
    GuestCluster
);
index_newtype!(
    /// Index of a cluster in the image file (`host offset >> cluster_bits`).
    HostCluster
);
