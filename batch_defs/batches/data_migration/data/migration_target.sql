-- The data_migration batch's target table (PostgreSQL, MySQL/MariaDB and SQLite alike).
create table if not exists migrated_customers (
    id integer primary key,
    full_name varchar(200) not null,
    email varchar(254) not null,
    country char(2) not null,
    signed_up date not null,
    balance numeric(12, 2) not null,
    active boolean not null
);
