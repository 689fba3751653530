-- rbac-proxy role store schema (SPEC §6): orgs with a plan, projects owned by one org, org-wide
-- members and per-project bindings, plus the NOTIFY triggers that make a role change visible to
-- every proxy replica at once (LISTEN rbac_proxy_invalidate).
--
-- Idempotent: `rbac-proxy store init --store postgresql://...` applies it in one transaction on
-- every run (IF NOT EXISTS, CREATE OR REPLACE, DROP TRIGGER IF EXISTS). Objects go to the first
-- schema of the search_path (public by default; add `?search_path=rbac` to the DSN of both
-- `store init` and `serve` to use another schema).
--
-- Why a `roles` table instead of a CHECK listing admin/developer/support: role names are
-- configuration (routes.yaml `roles:`), so the list must not be frozen into the schema, yet a
-- typo ('develper') must not be storable either. The table is seeded with the shipped roles; an
-- operator who defines a new role in routes.yaml adds it here once:
--   INSERT INTO roles (name, description) VALUES ('billing', 'Billing manager');
-- Its CHECK is the role-name syntax routes.yaml accepts (proxy/policy/compile.py _ROLE_NAME).
--
-- Precedence: a member with an org-wide role (members.role NOT NULL) gets that role on every
-- project of the org; project_members rows only matter while members.role IS NULL ("Set by
-- Project"), exactly as in members.yaml and the decision core.

CREATE TABLE IF NOT EXISTS roles (
    name        text PRIMARY KEY CONSTRAINT roles_name_syntax CHECK (name ~ '^[a-z0-9_:.-]{1,63}$'),
    description text
);

INSERT INTO roles (name, description) VALUES
    ('admin', 'Organization Admin'),
    ('developer', 'Developer'),
    ('support', 'Support')
ON CONFLICT (name) DO NOTHING;

-- Ids are opaque text. `\S` = not blank; the 1000-character cap keeps a user id well inside the
-- 8000-byte NOTIFY payload limit, so a change to any storable member can always be announced.
CREATE TABLE IF NOT EXISTS orgs (
    id   text PRIMARY KEY CONSTRAINT orgs_id_syntax CHECK (id ~ '\S' AND length(id) <= 1000),
    -- Plans are routes.yaml configuration too (`plans:`, with "*" for every other plan), so any
    -- non-blank name is storable; the proxy honours only the roles its plan entry lists.
    plan text NOT NULL CONSTRAINT orgs_plan_syntax CHECK (plan ~ '\S' AND length(plan) <= 200)
);

CREATE TABLE IF NOT EXISTS projects (
    id     text PRIMARY KEY CONSTRAINT projects_id_syntax CHECK (id ~ '\S' AND length(id) <= 1000),
    org_id text NOT NULL REFERENCES orgs (id) ON UPDATE CASCADE ON DELETE CASCADE,
    -- Target of project_members' (project_id, org_id) key: a binding's project must belong to
    -- the binding's org (a project belongs to exactly one org, SPEC §6).
    CONSTRAINT projects_id_org_key UNIQUE (id, org_id)
);
CREATE INDEX IF NOT EXISTS projects_org_id_idx ON projects (org_id);

CREATE TABLE IF NOT EXISTS members (
    org_id  text NOT NULL REFERENCES orgs (id) ON UPDATE CASCADE ON DELETE CASCADE,
    user_id text NOT NULL
        CONSTRAINT members_user_id_syntax CHECK (user_id ~ '\S' AND length(user_id) <= 1000),
    -- NULL = "Set by Project": access only through project_members.
    role    text NULL REFERENCES roles (name) ON UPDATE CASCADE,
    PRIMARY KEY (org_id, user_id)
);
-- The proxy's lookup is by user: one index probe per cache miss.
CREATE INDEX IF NOT EXISTS members_user_id_idx ON members (user_id);

CREATE TABLE IF NOT EXISTS project_members (
    org_id     text NOT NULL,
    user_id    text NOT NULL,
    project_id text NOT NULL,
    role       text NOT NULL REFERENCES roles (name) ON UPDATE CASCADE,
    PRIMARY KEY (org_id, user_id, project_id),
    -- A binding needs a membership of the org (removing the member removes its bindings) ...
    FOREIGN KEY (org_id, user_id) REFERENCES members (org_id, user_id)
        ON UPDATE CASCADE ON DELETE CASCADE,
    -- ... and a project of that same org.
    FOREIGN KEY (project_id, org_id) REFERENCES projects (id, org_id)
        ON UPDATE CASCADE ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS project_members_user_id_idx ON project_members (user_id);
CREATE INDEX IF NOT EXISTS project_members_project_idx ON project_members (project_id, org_id);

-- Live invalidation. pg_notify is transactional: listeners hear nothing of a rolled-back change
-- and hear a committed one right after COMMIT; identical payloads of one transaction are merged.

-- A member row changed: invalidate that user (both users when an UPDATE moves the row).
CREATE OR REPLACE FUNCTION rbac_proxy_notify_user() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('rbac_proxy_invalidate', OLD.user_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('rbac_proxy_invalidate', NEW.user_id);
    END IF;
    RETURN NULL;
END
$$;

-- An org (plan) or project changed, or a table was truncated: the users affected are not known
-- row by row (or not cheaply), so every cached answer is dropped ('*').
CREATE OR REPLACE FUNCTION rbac_proxy_notify_all() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('rbac_proxy_invalidate', '*');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS members_notify ON members;
CREATE TRIGGER members_notify AFTER INSERT OR UPDATE OR DELETE ON members
    FOR EACH ROW EXECUTE FUNCTION rbac_proxy_notify_user();
DROP TRIGGER IF EXISTS members_notify_truncate ON members;
CREATE TRIGGER members_notify_truncate AFTER TRUNCATE ON members
    FOR EACH STATEMENT EXECUTE FUNCTION rbac_proxy_notify_all();

DROP TRIGGER IF EXISTS project_members_notify ON project_members;
CREATE TRIGGER project_members_notify AFTER INSERT OR UPDATE OR DELETE ON project_members
    FOR EACH ROW EXECUTE FUNCTION rbac_proxy_notify_user();
DROP TRIGGER IF EXISTS project_members_notify_truncate ON project_members;
CREATE TRIGGER project_members_notify_truncate AFTER TRUNCATE ON project_members
    FOR EACH STATEMENT EXECUTE FUNCTION rbac_proxy_notify_all();

DROP TRIGGER IF EXISTS orgs_notify ON orgs;
CREATE TRIGGER orgs_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON orgs
    FOR EACH STATEMENT EXECUTE FUNCTION rbac_proxy_notify_all();

DROP TRIGGER IF EXISTS projects_notify ON projects;
CREATE TRIGGER projects_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON projects
    FOR EACH STATEMENT EXECUTE FUNCTION rbac_proxy_notify_all();
