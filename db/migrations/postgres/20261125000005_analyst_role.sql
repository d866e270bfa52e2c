-- A read-only role for analysts: SELECT on every table of the schema, now and later. It cannot
-- log in by itself; grant it to analysts' own logins (GRANT orderflow_analyst TO alice).
-- Roles are cluster-wide: another database may have created it already.
DO $$
BEGIN
    CREATE ROLE orderflow_analyst NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
GRANT USAGE ON SCHEMA public TO orderflow_analyst;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO orderflow_analyst;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO orderflow_analyst;
