#!/bin/sh
# MariaDB on the volume: its system tables made at the first start;
# init.sql (the blog's database, user, schema and first post) at every
# start, idempotent.
set -e
mkdir -p /run/mysqld
if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=root --datadir=/var/lib/mysql --skip-test-db >/dev/null
fi
exec mariadbd --user=root --datadir=/var/lib/mysql --bind-address=0.0.0.0 \
    --skip-name-resolve --init-file=/blog-db/init.sql
