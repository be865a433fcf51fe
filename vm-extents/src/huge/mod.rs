//! Huge pages: where they come from (the [`pool`], hugetlb or THP, each [`page`] zeroed and
//! checked), what they cost (the [`ledger`], this VMM's memory cgroup), and the one way they
//! become guest RAM ([`install`]).

pub mod install;
pub mod ledger;
pub mod page;
pub mod pool;
